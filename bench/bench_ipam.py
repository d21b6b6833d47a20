"""Address allocation cost: the Cython bitmap against its pure-Python twin, side by side.

Usage: .venv/bin/python bench/bench_ipam.py [--json out.json] [--ops N]

For a /24, a /16 and a /8, each empty and 99.9 % full (random holes, seeded), and for each bitmap
implementation, it measures in nanoseconds per operation:

- `bitmap` level: the raw allocator step, `take(cursor, lo, hi)` (find and set in one call) and
  `clear` (release), i.e. what `_fast.bitmap` accelerates;
- `allocator` level: `AddressAllocator.allocate()` / `.release(addr)`, which adds the
  `ipaddress` objects and bookkeeping a caller really pays;
- `cycle`: one allocate immediately followed by its release, timed as one loop.

Allocations are timed in batches (up to 1,000 allocs, then the same addresses released), so the
fill level stays where it was set; the timer's own cost is measured and subtracted. The
nearly-full state is built once per (size, implementation) through the public `set` and handed
to `AddressAllocator` through its `bitmap_cls` factory. Prints a table and, with `--json`, writes
a list of dicts (one per measurement). The whole run takes well under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.core import bitmap as pure_bitmap
from agent.core.ipam import AddressAllocator

try:
    from _fast import bitmap as fast_bitmap
except ImportError:  # pragma: no cover - extension not built
    fast_bitmap = None  # type: ignore[assignment]

SUBNETS = ("10.0.0.0/24", "10.0.0.0/16", "10.0.0.0/8")
FILLS = (("empty", 0.0), ("99.9%", 0.999))
BATCH = 1000
_now = time.perf_counter_ns


def timer_overhead() -> int:
    """Median cost of one `t0 = now(); t1 = now()` pair, subtracted from every batch."""
    samples = []
    for _ in range(2000):
        t0 = _now()
        t1 = _now()
        samples.append(t1 - t0)
    return int(statistics.median(samples))


def build(cls: type, size: int, fill: float, seed: int = 1) -> tuple[Any, int]:
    """A bitmap with network, gateway and broadcast set and `fill` of the rest set too."""
    bm = cls(size)
    for i in (0, 1, size - 1):
        bm.set(i)
    if not fill:
        return bm, size - 3
    holes = max(1, round((size - 3) * (1 - fill)))
    hole_list = sorted(random.Random(seed).sample(range(2, size - 1), holes))
    set_bit = bm.set
    lo = 2
    for hole in [*hole_list, size - 1]:
        for i in range(lo, hole):
            set_bit(i)
        lo = hole + 1
    return bm, holes


def run_batches(
    alloc: Callable[[], Any], release: Callable[[Any], Any], free: int, ops: int, overhead: int
) -> tuple[float, float, float]:
    """ns per allocation, per release (`ops` of each, in batches of up to BATCH), and per
    allocate+release cycle (one timed loop: no per-batch cost, which matters at 1 free address).
    """
    batch = min(BATCH, free)
    t_alloc = t_release = done = 0
    while done < ops:
        t0 = _now()
        got = [alloc() for _ in range(batch)]
        t1 = _now()
        for item in got:
            release(item)
        t2 = _now()
        t_alloc += t1 - t0 - overhead
        t_release += t2 - t1 - overhead
        done += batch
    cycles = min(ops, 20_000)
    t0 = _now()
    for _ in range(cycles):
        release(alloc())
    t_cycle = _now() - t0 - overhead
    return t_alloc / done, t_release / done, t_cycle / cycles


def bench_bitmap(bm: Any, free: int, ops: int, overhead: int) -> tuple[float, float, float]:
    """The raw round-robin step on a bitmap, as the allocator takes it: `take` (find the next
    clear bit from a cursor and set it, one call); `clear` to release."""
    cursor = 0
    size = bm.size
    take, clear = bm.take, bm.clear

    def alloc() -> int:
        nonlocal cursor
        i = take(cursor, 0, size)
        cursor = i + 1
        return i

    return run_batches(alloc, clear, free, ops, overhead)


def bench_allocator(
    bm: Any, net: IPv4Network, free: int, ops: int, overhead: int
) -> tuple[float, float, float]:
    """AddressAllocator over the prepared bitmap (handed in through `bitmap_cls`)."""
    gw = IPv4Address(int(net.network_address) + 1)
    allocator = AddressAllocator(net, gw, bitmap_cls=lambda _size: bm)
    return run_batches(allocator.allocate, allocator.release, free, ops, overhead)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as a JSON list")
    parser.add_argument("--ops", type=int, default=50_000, help="operations per measurement")
    args = parser.parse_args(argv)
    impls = [("pure", pure_bitmap.Bitmap)]
    if fast_bitmap is not None:
        impls.insert(0, ("cython", fast_bitmap.Bitmap))
    else:
        print("warning: _fast.bitmap is not built; measuring the pure twin only", file=sys.stderr)
    overhead = timer_overhead()
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for subnet in SUBNETS:
        net = IPv4Network(subnet)
        for fill_name, fill in FILLS:
            for impl, cls in impls:
                t0 = time.perf_counter()
                bm, free = build(cls, net.num_addresses, fill)
                build_s = time.perf_counter() - t0
                measured = {
                    "bitmap": bench_bitmap(bm, free, args.ops, overhead),
                    "allocator": bench_allocator(bm, net, free, args.ops, overhead),
                }
                for level, (ns_alloc, ns_release, ns_cycle) in measured.items():
                    for op, ns in (
                        ("allocate", ns_alloc),
                        ("release", ns_release),
                        ("cycle", ns_cycle),
                    ):
                        results.append(
                            {
                                "level": level,
                                "subnet": subnet,
                                "fill": fill_name,
                                "free": free,
                                "impl": impl,
                                "op": op,
                                "ns_per_op": round(ns, 1),
                                "ops": args.ops,
                                "build_s": round(build_s, 3),
                            }
                        )
    report(results)
    print(f"\ntotal {time.perf_counter() - started:.1f} s, timer overhead {overhead} ns subtracted")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def report(results: list[dict[str, Any]]) -> None:
    """Print one row per (level, subnet, fill, op) with both implementations and their ratio."""
    rows: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for r in results:
        rows.setdefault((r["level"], r["subnet"], r["fill"], r["op"]), {})[r["impl"]] = r[
            "ns_per_op"
        ]
    print(
        f"{'level':<10} {'subnet':<12} {'fill':<6} {'op':<9} "
        f"{'cython ns':>10} {'pure ns':>10} {'cy/pure':>8} {'speedup':>8}"
    )
    for (level, subnet, fill, op), by in rows.items():
        cy, py = by.get("cython"), by.get("pure")
        ratio = f"{cy / py:8.3f}" if cy and py else f"{'-':>8}"
        speed = f"{py / cy:7.1f}x" if cy and py else f"{'-':>8}"
        cy_s = f"{cy:10.1f}" if cy is not None else f"{'-':>10}"
        print(f"{level:<10} {subnet:<12} {fill:<6} {op:<9} {cy_s} {py:10.1f} {ratio} {speed}")


if __name__ == "__main__":
    raise SystemExit(main())
