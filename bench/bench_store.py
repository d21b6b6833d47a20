"""What state safety costs: the store's guarded commit against a bare sqlite commit, the
ownership marks, and the two recoveries (a database rewritten from memory, a state rebuilt
from the kernel's marks).

Usage: .venv/bin/python bench/bench_store.py [--endpoints 10000] [--networks 1000]
       [--commits 2000] [--json PATH]

- commit: one endpoint record written and committed, p50/p99 in microseconds, for
  `agent.store.sqlite.Store` (a stat of the file before and after, the mirror updated) and,
  side by side in alternating rounds of 100, a bare `sqlite3` connection in WAL mode with the
  same schema, pragmas and statement (what the store did before the checks);
- marks: `marks.endpoint_mark` / `marks.network_mark` and `marks.decode`, microseconds each;
- rewrite: the database deleted under an open store holding N endpoints and M networks, then
  `Store.verify()` (a new file written from the mirror), milliseconds;
- rebuild: `rebuild.state_from_links` over the links of that state (decode every mark),
  milliseconds;
- open: what agentd's start pays to read that state: `open_store` (`PRAGMA quick_check`, every
  record decoded once into the mirror) against a bare connection reading the same records,
  alternated, median of 5, milliseconds.

No kernel object is made: everything runs in a temporary directory. Prints a table and, with
`--json`, writes one dict.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.core import marks, naming
from agent.core.model import Endpoint, Network, PortMapping
from agent.kernel.base import LinkInfo
from agent.service import rebuild
from agent.store.sqlite import _SCHEMA, _load, open_store


def network(i: int) -> Network:
    subnet = ipaddress.IPv4Network((0x0A000000 + (i << 8), 24))
    return Network(
        id=f"{i:064x}", name=f"net{i}", bridge=f"br-{i:012x}", subnet=str(subnet),
        gateway=str(subnet.network_address + 1), labels={"bench": "yes"}, created=1.8e9 + i,
    )  # fmt: skip


def endpoint(i: int, net: Network) -> Endpoint:
    base = ipaddress.IPv4Network(net.subnet).network_address
    return Endpoint(
        id=f"{i + (1 << 40):064x}", network_id=net.id, netns=f"/run/netns/bench-{i}",
        netns_key=f"4:{4026530000 + i}", ifname="eth0", host_ifname=f"na{i:013x}",
        ip=str(base + 2 + i % 250), mac=f"02:42:0a:00:{i >> 8 & 255:02x}:{i & 255:02x}",
        default_route=True, ports=(PortMapping(protocol="tcp", host_port=8000 + i % 1000,
                                               container_port=80),),
    )  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def bench_commits(tmp: Path, commits: int) -> dict[str, float]:
    net = network(1)
    guarded: list[float] = []
    bare: list[float] = []
    raw = sqlite3.connect(tmp / "bare.db", isolation_level=None)
    raw.isolation_level = "DEFERRED"
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=NORMAL")
    raw.executescript(_SCHEMA)
    encode = msgspec.json.Encoder().encode
    with open_store(tmp / "guarded") as store:
        for start in range(0, commits, 100):
            for i in range(start, start + 100):
                ep = endpoint(i, net)
                t0 = time.perf_counter()
                with store.transaction() as w:
                    w.put_endpoint(ep)
                guarded.append(time.perf_counter() - t0)
            for i in range(start, start + 100):
                ep = endpoint(i, net)
                t0 = time.perf_counter()
                with raw:
                    raw.execute(
                        "INSERT OR REPLACE INTO endpoints (id, network_id, netns_key, body) "
                        "VALUES (?,?,?,?)",
                        (ep.id, ep.network_id, ep.netns_key, encode(ep)),
                    )
                bare.append(time.perf_counter() - t0)
    raw.close()
    us = 1e6
    return {
        "commit_p50_us": pct(guarded, 0.5) * us,
        "commit_p99_us": pct(guarded, 0.99) * us,
        "bare_commit_p50_us": pct(bare, 0.5) * us,
        "bare_commit_p99_us": pct(bare, 0.99) * us,
        "commit_ratio_p50": pct(guarded, 0.5) / pct(bare, 0.5),
    }


def bench_marks(n: int = 20000) -> dict[str, float]:
    net = network(7)
    ep = endpoint(7, net)
    alias = marks.endpoint_mark(ep)

    def per_call(fn) -> float:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        return statistics.median(runs)

    return {
        "endpoint_mark_us": per_call(lambda: marks.endpoint_mark(ep)),
        "network_mark_us": per_call(lambda: marks.network_mark(net)),
        "decode_us": per_call(lambda: marks.decode(alias)),
        "endpoint_mark_bytes": len(alias),
    }


def bench_recoveries(tmp: Path, networks: int, endpoints: int) -> dict[str, float]:
    nets = [network(i) for i in range(networks)]
    eps = [endpoint(i, nets[i % networks]) for i in range(endpoints)]
    with open_store(tmp / "big") as store:
        with store.transaction() as w:
            for net in nets:
                w.put_network(net)
            for ep in eps:
                w.put_endpoint(ep)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store.path}{suffix}").unlink(missing_ok=True)
        t0 = time.perf_counter()
        assert store.verify() == "deleted"
        rewrite = time.perf_counter() - t0
        size = os.path.getsize(store.path)
    guarded, bare = [], []
    for _ in range(5):  # alternated: the start-up read, with the checks and the mirror, and bare
        t0 = time.perf_counter()
        with open_store(tmp / "big") as store:
            guarded.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        conn = sqlite3.connect(tmp / "big" / "netagent.db")
        conn.execute("PRAGMA journal_mode=WAL")
        _load(conn)
        bare.append(time.perf_counter() - t0)
        conn.close()
    index = {net.id: i for i, net in enumerate(nets, start=1)}
    links = [
        LinkInfo(index=index[n.id], name=n.bridge, kind="bridge", alias=marks.network_mark(n),
                 master=0, up=True, addresses=(), group=naming.LINK_GROUP)
        for n in nets
    ] + [
        LinkInfo(index=100000 + j, name=e.host_ifname, kind="veth", alias=marks.endpoint_mark(e),
                 master=index[e.network_id], up=True, addresses=(), group=naming.LINK_GROUP)
        for j, e in enumerate(eps)
    ]  # fmt: skip
    t0 = time.perf_counter()
    state, _ = rebuild.state_from_links(links)
    rebuilt = time.perf_counter() - t0
    assert len(state.endpoints) == endpoints and len(state.networks) == networks
    return {
        "rewrite_ms": rewrite * 1e3,
        "db_bytes": size,
        "rebuild_ms": rebuilt * 1e3,
        "open_ms": statistics.median(guarded) * 1e3,
        "bare_open_ms": statistics.median(bare) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--networks", type=int, default=1000)
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netagent-bench-store-") as d:
        result = {
            "endpoints": args.endpoints,
            "networks": args.networks,
            **bench_commits(Path(d), args.commits),
            **bench_marks(),
            **bench_recoveries(Path(d), args.networks, args.endpoints),
        }
    for key, value in result.items():
        print(f"{key:24} {value:12.2f}" if isinstance(value, float) else f"{key:24} {value:12}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
