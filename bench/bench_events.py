"""Decode one rtnetlink notification: pyroute2's parser vs the pure twin vs Cython.

    .venv/bin/python bench/bench_events.py [--json PATH] [--quick]

The messages are real: the script (re-exec'd in a private network namespace, see
bench/_common.py) creates a bridge with the agent's group and alias, a veth enslaved to it and
an address, and captures what the kernel announces: the bridge's last RTM_NEWLINK (~2 KB, ~40
attributes with statistics), the veth's RTM_DELLINK and the bridge's RTM_NEWADDR. Each decoder
runs on the same bytes; `filtered out` is a foreign link under the reader's filter
(`group=LINK_GROUP, indexes={...}`), the common case on a busy host. Median of repeats, in
nanoseconds per message.
"""

from __future__ import annotations

import importlib
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from _common import base_parser, isolate, table, write_json

from agent.core import nlevents as pure
from agent.core.naming import LINK_GROUP

ALIAS = "netagent:net:" + "b1" * 32


def capture() -> dict[str, bytes]:
    """One real datagram of each kind, from this (private) namespace's kernel."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
    sock.bind((0, 0x1 | 0x10))
    script = (
        f"ip link add benchbr group {LINK_GROUP} type bridge && ip link set benchbr up"
        f" alias {ALIAS} && ip addr add 10.66.0.1/24 dev benchbr"
        f" && ip link add benchv group {LINK_GROUP} type veth peer name benchp"
        " && ip link set benchv master benchbr"
        " && ip link del benchv"
    )
    subprocess.run(script, shell=True, check=True)
    time.sleep(0.05)
    found: dict[str, bytes] = {}
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            break
        for event in pure.decode(data):
            key = f"{type(event).__name__}:{event.action}:{getattr(event, 'name', '')}"
            found[key] = data  # the last one: the bridge up, with its alias
    sock.close()
    subprocess.run("ip link del benchbr", shell=True, check=True)
    return {
        "RTM_NEWLINK bridge": found["LinkEvent:new:benchbr"],
        "RTM_DELLINK veth": found["LinkEvent:del:benchv"],
        "RTM_NEWADDR v4": found["AddrEvent:new:"],
    }


def measure(fn: Callable[[bytes], Any], data: bytes, loops: int, repeats: int) -> float:
    """Median nanoseconds per call."""
    fn(data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn(data)
        times.append((time.perf_counter_ns() - start) / loops)
    return statistics.median(times)


def decoders() -> dict[str, Callable[[bytes], Any]]:
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    def pyroute2(data: bytes) -> Any:
        msg = ifaddrmsg(data) if data[4] in (20, 21) else ifinfmsg(data)
        msg.decode()
        return msg

    found: dict[str, Callable[[bytes], Any]] = {"pyroute2": pyroute2, "pure": pure.decode}
    try:
        fast = importlib.import_module("_fast.nlevents")
    except ImportError:
        print("warning: _fast.nlevents is not built; no Cython figures")
    else:
        found["cython"] = fast.decode
    return found


def main() -> int:
    isolate()
    args = base_parser("events", __doc__).parse_args()
    loops, repeats = (200, 5) if args.quick else (2000, 15)
    messages = capture()
    # A foreign link: the bridge's NEWLINK with its group and alias not ours, under the filter.
    stranger = messages["RTM_NEWLINK bridge"].replace(ALIAS.encode(), b"x" * len(ALIAS))
    stranger = stranger.replace(LINK_GROUP.to_bytes(4, "little"), b"\0\0\0\0")
    impls = decoders()
    rows, results = [], []
    for label, data in messages.items():
        row = {"message": label, "bytes": len(data)}
        for impl, fn in impls.items():
            row[f"{impl}_ns"] = round(
                measure(fn, data, loops // (20 if impl == "pyroute2" else 1), repeats)
            )
        results.append(row)
    indexes = {10_000}
    for impl in ("pure", "cython"):
        if impl in impls:
            fn = impls[impl]
            assert fn(stranger, LINK_GROUP, indexes) == []
            results[0][f"{impl}_filtered_out_ns"] = round(
                measure(lambda d, fn=fn: fn(d, LINK_GROUP, indexes), stranger, loops, repeats)
            )
    for row in results:
        speedups = {
            f"cython_vs_{k}": round(row[f"{k}_ns"] / row["cython_ns"], 1)
            for k in ("pyroute2", "pure")
            if "cython_ns" in row
        }
        row.update(speedups)
        rows.append(
            [
                row["message"],
                row["bytes"],
                *(row.get(f"{i}_ns") for i in impls),
                *(speedups.values()),
            ]
        )
    headers = ["message", "bytes", *(f"{i} ns" for i in impls)]
    if "cython" in impls:
        headers += ["cy vs pyroute2", "cy vs pure"]
    print(table(headers, rows))
    first = results[0]
    print(
        "filtered-out foreign RTM_NEWLINK: "
        + ", ".join(
            f"{i} {first[f'{i}_filtered_out_ns']} ns"
            for i in ("pure", "cython")
            if f"{i}_filtered_out_ns" in first
        )
    )
    write_json(args.json, "events", args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
