"""What metrics and the audit log cost: churn while scraped vs not, and the hooks' own cost.

Usage: .venv/bin/python bench/bench_metrics.py [--clients 16] [--duration 5] [--rounds 3]
                                               [--quick] [--json PATH]

1. Churn (attach + detach cycles, `--clients` threads, as bench_churn) against one agentd
   started with `--metrics 127.0.0.1:9464`, in interleaved rounds: not scraped, scraped once a
   second, scraped ten times a second (Prometheus' default is once every 15 s) by a real HTTP
   client; cycles/s per round, scrape latency and size. The scrape is rendered on agentd's Trio
   loop, so its cost shows here.
2. The hooks that run on every request whether scraped or not, timed in this process: a
   kernel/firewall call through `Metrics.instrument`'s wrapper vs the bare coroutine, and a
   mutation through `observe.observed` (histogram + audit line rendered to /dev/null) vs the
   bare handler. Per churn cycle: 2 requests and the kernel/firewall calls the scrape counted,
   against the cycle's share of agentd's time (1 / cycles per second).
"""

from __future__ import annotations

import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c
import trio
from bench_attach import NetagentApi
from bench_churn import Loop, churn
from prometheus_client.parser import text_string_to_metric_families

PORT = 9464
MODES = {"plain": 0.0, "scraped 1/s": 1.0, "scraped 10/s": 10.0}  # scrapes per second


class Scraper:
    """Scrapes /metrics at `hz` from its own thread (in agentd's namespace) while `on`."""

    def __init__(self, netns_path: str) -> None:
        self.netns_path, self.period = netns_path, 1.0
        self.on = threading.Event()
        self.stop = threading.Event()
        self.seconds: list[float] = []
        self.size = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        c.setns(self.netns_path)
        while not self.stop.is_set():
            if not self.on.wait(0.05):
                continue
            self.scrape()
            time.sleep(self.period)

    def scrape(self) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read()
        conn.close()
        self.seconds.append(time.perf_counter() - t0)
        self.size = len(body)


def scrape_once(host: str) -> str:
    """One scrape from outside the loop's timing (curl in agentd's namespace)."""
    return c.sh("ip", "netns", "exec", host, "curl", "-sf", f"http://127.0.0.1:{PORT}/metrics")


def counts(text: str) -> dict[str, float]:
    """Histogram counts summed by metric family and call label."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_count") and "call" in s.labels:
                key = f"{family.name}:{s.labels['call']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def churn_rounds(args: Any, workdir: Path) -> dict[str, Any]:
    agentd = c.Agentd("h-metrics", "--metrics", f"127.0.0.1:{PORT}", workdir=workdir)
    try:
        agentd.start()
        from agent.frontends.jsonrpc import protocol as p

        agentd.client().call("network.create", p.NetworkCreate(name="bench"))
        namespaces = [f"mx{i}" for i in range(args.clients)]
        c.add_netns(namespaces)
        scraper = Scraper(agentd.netns_path)
        rounds: dict[str, list[float]] = {mode: [] for mode in MODES}
        per_cycle: dict[str, float] = {}
        for _ in range(args.rounds):
            for mode, hz in MODES.items():
                loops = [Loop(i, NetagentApi(agentd), ns, None) for i, ns in enumerate(namespaces)]
                before = counts(scrape_once(agentd.host))
                if hz:
                    scraper.period = 1 / hz
                    scraper.on.set()
                result = churn(loops, args.duration)
                scraper.on.clear()
                after = counts(scrape_once(agentd.host))
                rounds[mode].append(result["cycles_per_s"])
                if result["cycles"]:
                    for key, value in after.items():
                        per_cycle[key] = (value - before.get(key, 0.0)) / result["cycles"]
        scraper.stop.set()
        scraper.thread.join()
        scrape_s = sorted(scraper.seconds)
        median = {k: statistics.median(v) for k, v in rounds.items()}
        return {
            "clients": args.clients,
            "cycles_per_s": median,
            "rounds": rounds,
            "vs_plain": {k: c.ratio(v, median["plain"]) for k, v in median.items()},
            "scrape": c.summarize(scrape_s),
            "scrape_bytes": scraper.size,
            "calls_per_cycle": {k: round(v, 3) for k, v in per_cycle.items() if v},
        }
    finally:
        agentd.close()


def hook_costs(n: int) -> dict[str, float]:
    """Microseconds a hook adds to one call (median of 5 runs of `n` calls each)."""
    from agent import log as agent_log
    from agent import metrics
    from agent.frontends.jsonrpc import protocol as p
    from agent.frontends.jsonrpc.observe import observed

    devnull = open(os.devnull, "w")  # noqa: SIM115 - the audit lines' destination, kept open
    sys.stderr, real_stderr = devnull, sys.stderr
    agent_log.configure("info", "json")
    sys.stderr = real_stderr
    stats = metrics.Metrics()

    class Proto:
        async def call(self) -> None: ...

    class Obj:
        async def call(self) -> None:
            return None

    bare_obj, timed_obj = Obj(), Obj()
    stats.instrument(timed_obj, Proto, stats.kernel_seconds)

    async def handler(params: Any) -> int:
        return 1

    table = observed({"network.create": handler}, stats.observe_request)
    params = p.NetworkCreate(name="x")

    async def loop(fn: Any, *a: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await fn(*a)
        return (time.perf_counter() - t0) / n * 1e6

    async def measure() -> dict[str, float]:
        runs: dict[str, list[float]] = {k: [] for k in ("bare", "timed", "handler", "observed")}
        for _ in range(5):
            runs["bare"].append(await loop(bare_obj.call))
            runs["timed"].append(await loop(timed_obj.call))
            runs["handler"].append(await loop(handler, params))
            runs["observed"].append(await loop(table["network.create"], params))
        med = {k: statistics.median(v) for k, v in runs.items()}
        return {
            "instrument_us": round(med["timed"] - med["bare"], 2),
            "request_hook_us": round(med["observed"] - med["handler"], 2),
        }

    return trio.run(measure)


def main() -> None:
    c.isolate()
    ap = c.base_parser("metrics", __doc__)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per round and mode")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rounds = min(args.duration, 2.0), 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    try:
        results: dict[str, Any] = {"churn": churn_rounds(args, workdir)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["hooks"] = hooks = hook_costs(2000 if args.quick else 20000)
    ch = results["churn"]
    calls = ch["calls_per_cycle"]
    timed_calls = sum(calls.values())
    per_cycle_us = 2 * hooks["request_hook_us"] + timed_calls * hooks["instrument_us"]
    cycle_us = 1e6 / ch["cycles_per_s"]["plain"]
    results["hooks"].update(
        timed_calls_per_cycle=round(timed_calls, 2),
        per_cycle_us=round(per_cycle_us, 1),
        share_of_cycle=round(per_cycle_us / cycle_us, 4),
    )
    print(f"{args.clients} clients, {args.rounds} interleaved rounds of {args.duration:g} s")
    print(
        c.table(
            ["mode", "cycles/s (median)", "x plain", "rounds"],
            [[m, ch["cycles_per_s"][m], ch["vs_plain"][m], ch["rounds"][m]] for m in MODES],
        )
    )
    print(
        f"scrape latency p50 {ch['scrape'].get('p50')} ms, p99 {ch['scrape'].get('p99')} ms "
        f"(under churn), {ch['scrape_bytes']} bytes"
    )
    print(
        f"hooks: {hooks['instrument_us']} us per timed kernel/firewall call, "
        f"{hooks['request_hook_us']} us per request (histogram + audit line); per cycle "
        f"{hooks['per_cycle_us']} us = {hooks['share_of_cycle']:.2%} of a cycle's "
        f"{cycle_us:.0f} us ({hooks['timed_calls_per_cycle']} timed calls: {calls})"
    )
    c.write_json(args.json, "metrics", args, results)


if __name__ == "__main__":
    main()
