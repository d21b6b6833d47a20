"""Scale: network create/remove latency, and attach latency as networks and endpoints pile up.

Usage: .venv/bin/python bench/bench_scale.py [--networks 1000] [--endpoints 10000]
       [--create-trials 100] [--attach-trials 150] [--quick] [--json PATH]

One agentd (pool 10.0.0.0/8 cut in /24s, so there are subnets for every network), driven over
one Client connection:
1. `network.create` then `network.remove` latency, `--create-trials` each, with only the default
   network present, back to back; then up to 20 removals 0.1 s apart (`remove_spaced`);
2. attach/detach latency (`--attach-trials`, fresh namespace each) to network `s0` with 1 network,
   then 100, then `--networks` networks present (the networks are made between stages; their
   create latency is recorded too, so the cost of the N-th create shows);
3. the same with `--endpoints` more endpoints present, spread round robin over the networks
   already there (10 per network at 1,000 / 10,000, as on a CI host with many small networks;
   `--crowded` puts them on extra /22 networks of 1,000 endpoints each instead: a Linux bridge
   takes at most 1,024 ports, and every port added costs the kernel work proportional to the
   bridge's size), as many namespaces made with one `ip -b` batch and connected by 4 client
   threads; and the RSS of agentd and its kernel worker together.
In stages 2 and 3 each trial is followed by one of the kernel floor (`bench_attach.Floor`, the
bare kernel work on a bridge of its own) in agentd's namespace: how much the kernel itself
slows down as namespaces and links pile up.
Setup times are reported: at 10,000 endpoints most of the run is building the state.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c
from _common import NsWorker
from bench_attach import Floor

from agent.frontends.jsonrpc import protocol as p


def timed(client: Any, method: str, params: Any) -> float:
    t0 = time.perf_counter()
    client.call(method, params)
    return time.perf_counter() - t0


def create_remove(client: Any, trials: int) -> dict[str, Any]:
    """Back to back, then removals 0.1 s apart (`remove_spaced`): a removal's firewall commit
    waits for the previous one's grace period when they follow closely (see
    agent/firewall/iptables/restore.py)."""
    create = [
        timed(client, "network.create", p.NetworkCreate(name=f"cr{i}")) for i in range(trials)
    ]
    remove = [
        timed(client, "network.remove", p.NetworkRemove(network=f"cr{i}")) for i in range(trials)
    ]
    spaced = min(trials, 20)
    for i in range(spaced):
        client.call("network.create", p.NetworkCreate(name=f"cs{i}"))
    remove_spaced = []
    for i in range(spaced):
        time.sleep(0.1)
        remove_spaced.append(timed(client, "network.remove", p.NetworkRemove(network=f"cs{i}")))
    return {
        "create": c.summarize(create),
        "remove": c.summarize(remove),
        "remove_spaced": c.summarize(remove_spaced),
    }


def fill_networks(client: Any, first: int, upto: int) -> list[float]:
    """Create networks s{first}..s{upto-1}; their create latencies."""
    return [
        timed(client, "network.create", p.NetworkCreate(name=f"s{i}")) for i in range(first, upto)
    ]


class AttachProbe:
    """Attach/detach trials to network s0, each in a fresh namespace made beforehand; each
    trial is followed by one of the kernel floor (`bench_attach.Floor`: the bare kernel work,
    on its own bridge) in agentd's namespace, so the floor sees the same networks, endpoints
    and namespace ids."""

    WARMUP = 3  # unrecorded trials at the start of each stage

    def __init__(self, client: Any, per_stage: int, stages: int, host: NsWorker) -> None:
        self.client, self.per_stage, self.host = client, per_stage, host
        self.names = [f"pr{i}" for i in range((per_stage + self.WARMUP) * stages * 2)]
        c.add_netns(self.names)
        self.floor = host.call(Floor)
        self.next = 0

    def _path(self) -> str:
        self.next += 1
        return f"/run/netns/{self.names[self.next - 1]}"

    def stage(self) -> dict[str, Any]:
        attach, detach, floor = [], [], []
        for _ in range(self.per_stage + self.WARMUP):
            path = self._path()
            attach.append(timed(self.client, "endpoint.connect", c.connect_params("s0", path)))
            detach.append(
                timed(self.client, "endpoint.disconnect", c.disconnect_params("s0", path))
            )
            path, cid = self._path(), f"{self.next:010d}"
            t0 = time.perf_counter()
            self.host.call(self.floor.attach, cid, path)
            floor.append(time.perf_counter() - t0)
            self.host.call(self.floor.detach, cid, path)
        return {
            "attach": c.summarize(attach[self.WARMUP :]),
            "detach": c.summarize(detach[self.WARMUP :]),
            "floor_attach": c.summarize(floor[self.WARMUP :]),
        }


PER_BRIDGE = 1000  # a Linux bridge takes at most 1,024 ports (BR_MAX_PORTS): EXFULL past that


def fill_endpoints(
    agentd: c.Agentd, count: int, spread: list[str] | None, threads: int = 4
) -> dict[str, Any]:
    """`count` namespaces connected round robin to the networks `spread`, or (None) to networks
    big0, big1... (/22 each, <= PER_BRIDGE endpoints per network); setup timings."""
    client = agentd.client()
    if spread:
        nets = spread
    else:
        nets = [f"big{k}" for k in range(-(-count // PER_BRIDGE))]
        for k, net in enumerate(nets):
            subnet = f"100.{64 + k // 64}.{(k % 64) * 4}.0/22"
            client.call("network.create", p.NetworkCreate(name=net, subnet=subnet))
    names = [f"e{i}" for i in range(count)]
    netns_s = c.add_netns(names)
    errors: list[str] = []

    def work(part: range) -> None:
        client = agentd.client()
        for i in part:
            try:
                net = nets[i % len(nets)] if spread else nets[i // PER_BRIDGE]
                client.call("endpoint.connect", c.connect_params(net, f"/run/netns/{names[i]}"))
            except Exception as exc:
                errors.append(f"{names[i]}: {exc}")

    t0 = time.perf_counter()
    workers = [
        threading.Thread(target=work, args=(range(k, count, threads),)) for k in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    connect_s = time.perf_counter() - t0
    return {
        "count": count,
        "networks": len(nets),
        "netns_setup_s": round(netns_s, 2),
        "connect_setup_s": round(connect_s, 2),
        "connects_per_s": round(count / connect_s, 1) if connect_s else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def run(args: Any, workdir: Path) -> dict[str, Any]:
    agentd = c.Agentd("h-scale", "--pool", "10.0.0.0/8:24", workdir=workdir)
    host: NsWorker | None = None
    try:
        agentd.start()
        client = agentd.client()
        out: dict[str, Any] = {"rss_mb": {"start": round(agentd.rss_mb(), 1)}}
        out["create_remove"] = create_remove(client, args.create_trials)
        levels = sorted({1, min(100, args.networks), args.networks})
        host = NsWorker(agentd.netns_path)
        probe = AttachProbe(client, args.attach_trials, len(levels) + 1, host)
        stages: dict[str, Any] = {}
        have = 0
        for level in levels:
            t0 = time.perf_counter()
            creates = fill_networks(client, have, level)
            stage = probe.stage()
            stage["setup_s"] = round(time.perf_counter() - t0, 2)
            if creates:
                stage["create_last_10pct"] = c.summarize(creates[-max(1, len(creates) // 10) :])
            stages[f"{level} network(s)"] = stage
            have = level
            print(f"  {level} network(s): attach p50 {stage['attach']['p50']} ms", flush=True)
        out["rss_mb"][f"{have} network(s)"] = round(agentd.rss_mb(), 1)
        if args.endpoints:
            spread = None if args.crowded else [f"s{k}" for k in range(have)]
            out["endpoints_setup"] = fill_endpoints(agentd, args.endpoints, spread)
            key = f"{have} network(s) + {args.endpoints} endpoints"
            stages[key] = probe.stage()
            out["rss_mb"][key] = round(agentd.rss_mb(), 1)
            print(f"  {key}: attach p50 {stages[key]['attach']['p50']} ms", flush=True)
        out["stages"] = stages
        t0 = time.perf_counter()
        agentd.stop()
        out["stop_s"] = round(time.perf_counter() - t0, 2)
        return out
    finally:
        if host is not None:
            host.close()
        agentd.close()


def report(args: Any, out: dict[str, Any]) -> None:
    cr = out["create_remove"]
    print(
        c.table(
            ["operation (ms)", "n", "p50", "p90", "p99", "mean"],
            [
                [f"network.{k}", v["n"], v["p50"], v["p90"], v["p99"], v["mean"]]
                for k, v in cr.items()
            ],
        )
    )
    print()
    stages = out["stages"]
    base = stages["1 network(s)"]["attach"]["p50"]
    floor_base = stages["1 network(s)"]["floor_attach"]["p50"]
    rows = []
    for name, st in stages.items():
        last = st.get("create_last_10pct", {})
        rows.append(
            [
                name,
                st["attach"]["p50"],
                st["attach"]["p99"],
                st["detach"]["p50"],
                st["detach"]["p99"],
                c.ratio(st["attach"]["p50"], base),
                st["floor_attach"]["p50"],
                c.ratio(st["floor_attach"]["p50"], floor_base),
                last.get("p50"),
                st.get("setup_s"),
            ]
        )
    print(
        c.table(
            [
                "state",
                "att p50",
                "att p99",
                "det p50",
                "det p99",
                "att x 1-net",
                "floor att p50",
                "floor x 1-net",
                "create p50 (last 10%)",
                "setup s",
            ],
            rows,
        )
    )
    if "endpoints_setup" in out:
        es = out["endpoints_setup"]
        print(
            f"\n{es['count']} endpoints: namespaces in {es['netns_setup_s']} s, connected in "
            f"{es['connect_setup_s']} s ({es['connects_per_s']}/s, 4 clients, "
            f"{es['networks']} networks), "
            f"errors {es['errors']}"
        )
    print("agentd + worker RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in out["rss_mb"].items()))
    if args.endpoints < 10000 or args.networks < 1000:
        print(
            f"note: ran with {args.networks} networks and {args.endpoints} endpoints "
            "(targets are stated for 1,000 and 10,000; pass --networks/--endpoints)"
        )


def main() -> None:
    c.isolate()
    ap = c.base_parser("scale", __doc__)
    ap.add_argument("--networks", type=int, default=1000)
    ap.add_argument(
        "--crowded",
        action="store_true",
        help="put the endpoints on networks of 1,000 endpoints each",
    )
    ap.add_argument(
        "--endpoints",
        type=int,
        default=2000,
        help="target 10,000 (about 5 min here: connects slow down as they grow)",
    )
    ap.add_argument("--create-trials", type=int, default=100)
    ap.add_argument("--attach-trials", type=int, default=150)
    args = ap.parse_args()
    if args.quick:
        args.networks = min(args.networks, 100)
        args.endpoints = min(args.endpoints, 300)
        args.create_trials, args.attach_trials = min(args.create_trials, 20), 10
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        t0 = time.perf_counter()
        out = run(args, workdir)
        out["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(args, out)
    print(f"total {out['total_s']} s")
    c.write_json(args.json, "scale", args, out)


if __name__ == "__main__":
    main()
