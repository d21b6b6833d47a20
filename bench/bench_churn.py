"""Churn: many concurrent clients attaching and detaching for a fixed time, netagent vs peers.

Usage: .venv/bin/python bench/bench_churn.py [--clients 64] [--duration 20] [--quick] [--json P]

For each contender in turn (never at the same time), `--clients` threads each own one
namespace and loop attach -> detach until the deadline:
- `netagent`: each thread has its own Client connection to agentd (one network);
- `netagent-nft`: the same with `agentd --firewall nftables` (issue 13: no worse than iptables);
- `cni-bridge`: each thread runs the CNI bridge plugin (ADD / DEL) as a process, so 64 plugin
  processes run in parallel (host-local serialises on its file lock, as in production);
- `netavark`: each thread runs `netavark setup / teardown` with its own static address.
Threads only wait on a socket or a child process, so the GIL is not the bottleneck; the bench
process and the contender share the machine's 2 cores, alike for all.

Reported: completed cycles per second (a cycle = one attach + one detach), attach and detach
latency percentiles, failed operations (with the first error) and endpoints left behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c
from bench_attach import CniBridge, NetagentApi, Netavark

PREFIX = {"netagent": "na", "netagent-nft": "nn", "cni-bridge": "cb", "netavark": "nv"}


class Loop:
    """One client: its namespace, its contender instance and its samples."""

    def __init__(self, index: int, impl: Any, netns: str, host_path: str | None) -> None:
        self.index, self.impl, self.netns, self.host_path = index, impl, netns, host_path
        self.attach_s: list[float] = []
        self.detach_s: list[float] = []
        self.errors: list[str] = []

    def run(self, start: threading.Barrier, deadline_box: list[float]) -> None:
        if self.host_path is not None:
            c.setns(self.host_path)  # children (plugins) start in the contender's host
        cid, path, slot = f"churn{self.index:04d}", f"/run/netns/{self.netns}", self.index
        start.wait()
        deadline = deadline_box[0]
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                self.impl.attach(cid, path, slot)
            except Exception as exc:
                self.errors.append(f"attach: {exc}")
                time.sleep(0.01)
                continue
            t1 = time.perf_counter()
            try:
                self.impl.detach(cid, path, slot)
            except Exception as exc:
                self.errors.append(f"detach: {exc}")
                continue
            t2 = time.perf_counter()
            self.attach_s.append(t1 - t0)
            self.detach_s.append(t2 - t1)


def churn(loops: list[Loop], duration: float) -> dict[str, Any]:
    """Run every loop in its own thread for `duration` seconds; summarise."""
    start = threading.Barrier(len(loops) + 1)
    deadline: list[float] = [0.0]
    threads = [threading.Thread(target=lp.run, args=(start, deadline), daemon=True) for lp in loops]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    attach = [s for lp in loops for s in lp.attach_s]
    detach = [s for lp in loops for s in lp.detach_s]
    errors = [e for lp in loops for e in lp.errors]
    return {
        "clients": len(loops),
        "elapsed_s": round(elapsed, 3),
        "cycles": len(attach),
        "cycles_per_s": round(len(attach) / elapsed, 2),
        "attach": c.summarize(attach),
        "detach": c.summarize(detach),
        "errors": len(errors),
        "first_error": errors[0][:300] if errors else None,
    }


def leftover_veths(host: str) -> int:
    """veth links still in a host namespace (the keeper excluded by the caller)."""
    links = json.loads(c.sh("ip", "-n", host, "-j", "-d", "link", "show", "type", "veth"))
    return len(links)


def run_contender(name: str, args: Any, workdir: Path, keep: list[Any]) -> dict[str, Any]:
    host = f"h-{name}"
    namespaces = [f"{PREFIX[name]}{i}" for i in range(args.clients)]
    c.add_netns([*namespaces, f"{PREFIX[name]}keeper"])
    keeper = ("keeper", f"/run/netns/{PREFIX[name]}keeper", 249)
    if name.startswith("netagent"):  # netagent (iptables), netagent-nft (--firewall nftables)
        fw = ("--firewall", "nftables") if name == "netagent-nft" else ()
        agentd = c.Agentd(host, "--pool", "10.200.0.0/16:24", *fw, workdir=workdir)
        keep.append(agentd)
        agentd.start()
        from agent.frontends.jsonrpc import protocol as p

        agentd.client().call("network.create", p.NetworkCreate(name="bench"))
        NetagentApi(agentd).attach(*keeper)
        loops = [Loop(i, NetagentApi(agentd), ns, None) for i, ns in enumerate(namespaces)]
    else:
        c.sh("ip", "netns", "add", host)
        c.sh("ip", "-n", host, "link", "set", "lo", "up")
        cls = CniBridge if name == "cni-bridge" else Netavark
        impl = cls(f"/run/netns/{host}", workdir)
        worker = c.NsWorker(f"/run/netns/{host}")
        try:
            worker.call(impl.attach, *keeper)
        finally:
            worker.close()
        loops = [Loop(i, impl, ns, f"/run/netns/{host}") for i, ns in enumerate(namespaces)]
    result = churn(loops, args.duration)
    if name.startswith("netagent"):  # a detach answers once the veth is cut off (batched)
        client = keep[-1].client()
        deadline = time.monotonic() + 10
        while client.call("system.info")["pending_deletions"] and time.monotonic() < deadline:
            time.sleep(0.005)
    result["veths_left"] = leftover_veths(host) - 1  # the keeper's
    return result


def main() -> None:
    c.isolate()
    ap = c.base_parser("churn", __doc__)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per contender")
    ap.add_argument(
        "--only",
        default="netagent,netagent-nft,cni-bridge,netavark",
        help="comma-separated contenders (default: %(default)s); netagent-nft: --firewall nftables",
    )
    args = ap.parse_args()
    if args.quick:
        args.duration = min(args.duration, 3.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-churn-"))
    keep: list[Any] = []
    results: dict[str, Any] = {}
    try:
        for name in args.only.split(","):
            try:
                results[name] = run_contender(name, args, workdir, keep)
            except Exception as exc:
                results[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            finally:
                for item in reversed(keep):
                    item.close()
                keep.clear()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.clients} concurrent clients, {args.duration:g} s each")
    base = results.get("netagent", {}).get("cycles_per_s")
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            print(f"skipped {name}: {r['skipped']}")
            continue
        r["netagent_speedup"] = c.ratio(base, r["cycles_per_s"])
        rows.append(
            [
                name,
                r["cycles_per_s"],
                r["cycles"],
                r["attach"].get("p50"),
                r["attach"].get("p99"),
                r["detach"].get("p50"),
                r["detach"].get("p99"),
                r["errors"],
                r["veths_left"],
                r["netagent_speedup"],
            ]
        )
        if r["first_error"]:
            print(f"{name}: first error: {r['first_error']}")
    print(
        c.table(
            [
                "contender",
                "cycles/s",
                "cycles",
                "att p50",
                "att p99",
                "det p50",
                "det p99",
                "errors",
                "veths left",
                "netagent x",
            ],
            rows,
        )
    )
    print("latencies in ms; netagent x = netagent cycles/s / contender cycles/s")
    c.write_json(args.json, "churn", args, results)


if __name__ == "__main__":
    main()
