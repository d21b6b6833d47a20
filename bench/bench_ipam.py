"""Address allocation cost: the Cython accelerators against their pure-Python twins, side by side.

Usage: .venv/bin/python bench/bench_ipam.py [--json out.json] [--ops N]

For a /24, a /16 and a /8, each empty and 99.9 % full (random holes, seeded), and for each
implementation (`_fast.bitmap` and `agent.core.bitmap`, in the same run), it measures in
nanoseconds per operation, at three levels:

- `bitmap`: the raw bitmap step, `Bitmap.take(cursor, 0, size)` (find and set in one call)
  through a small closure that keeps the cursor (the same closure for both twins), and
  `Bitmap.clear` to release;
- `core`: `RangeAllocator.allocate()` and `.release(i)`, the bound methods called directly:
  everything one network's allocation needs (cursor, range, fixed offsets, counters, wrap), in
  integers;
- `allocator`: `AddressAllocator.allocate()` / `.release(addr)` over that same RangeAllocator,
  which adds the `ipaddress` objects a caller really pays.

What is timed, identically for both implementations (only the bound methods differ):

- `allocate`: `got = [alloc() for _ in itertools.repeat(None, batch)]`, batch = min(1,000,
  free offsets), between two `perf_counter_ns()` calls; the batch is then released, so the fill
  level stays where it was set. Batches are repeated until `--ops` allocations are done;
- `release`: `for item in got: release(item)` on that batch, between two timer calls;
- `cycle`: `for _ in itertools.repeat(None, 1000): release(alloc())` between two timer calls,
  repeated min(ops, 20,000) / 1,000 times (no list: this is the figure to read when a single
  offset is free).

When a single offset is free (the nearly full /24) the batch is 1, a single call is below what
the timer resolves, and only `cycle` is measured (`allocate`/`release` print `-`). The loop, the
list and the call into the method are part of every figure; the only thing subtracted is the
timer's own cost (the median of 2,000 `t0 = now(); t1 = now()` pairs), once per timed section.
Each figure is the median over its timed sections of the per-operation time, so that a section
hit by another process on a busy machine does not skew it. The nearly-full state is built once per
(size, implementation): a Bitmap through its public `set` for the `bitmap` level, a
RangeAllocator through its public `claim` for `core` and `allocator` (handed to AddressAllocator
through its `range_allocator` factory). Prints a table and, with `--json`, writes a list of dicts
(one per measurement). A last line gives the loop's own cost per item and that of calling a C
method that does nothing (`set.discard`), the floor under any figure here. The whole run takes
well under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
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
from agent.core.bitmap import CLAIMED
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


def call_floor(overhead: int) -> dict[str, float]:
    """ns per item of the `release` loop's own shape with nothing behind it: the bare loop, and
    a call of a C method that does almost nothing (`set.discard` of a missing int). Every
    figure above includes the first; no method called from Python gets below the second."""
    items, empty = list(range(BATCH)), set()
    discard = empty.discard
    loops, calls = [], []
    for _ in range(200):
        t0 = _now()
        for _item in items:
            pass
        t1 = _now()
        for item in items:
            discard(item)
        t2 = _now()
        loops.append((t1 - t0 - overhead) / BATCH)
        calls.append((t2 - t1 - overhead) / BATCH)
    return {"empty loop": statistics.median(loops), "set.discard": statistics.median(calls)}


def _holes(size: int, fill: float, seed: int) -> list[int]:
    """Sorted free host offsets (never 0, 1 or size - 1) leaving `fill` of the rest set."""
    if not fill:
        return list(range(2, size - 1))
    count = max(1, round((size - 3) * (1 - fill)))
    return sorted(random.Random(seed).sample(range(2, size - 1), count))


def build(cls: type, size: int, fill: float, seed: int = 1) -> tuple[Any, int]:
    """A bitmap with network, gateway and broadcast set and `fill` of the rest set too."""
    bm = cls(size)
    for i in (0, 1, size - 1):
        bm.set(i)
    if not fill:
        return bm, size - 3
    holes = _holes(size, fill, seed)
    _take_all_but(bm.set, size, holes)
    return bm, len(holes)


def _take_all_but(take: Callable[[int], Any], size: int, holes: list[int]) -> None:
    """`take` every offset of [2, size - 1) that is not a hole."""
    lo = 2
    for hole in [*holes, size - 1]:
        for i in range(lo, hole):
            take(i)
        lo = hole + 1


def build_core(cls: type, size: int, fill: float, seed: int = 1) -> tuple[Any, int]:
    """A RangeAllocator over [0, size) with network, gateway and broadcast fixed and the same
    holes as `build` (same seed), the rest claimed."""
    core = cls(size, 0, size, (0, 1, size - 1))
    if not fill:
        return core, core.free
    holes = _holes(size, fill, seed)
    claim = core.claim
    _take_all_but(claim, size, holes)
    assert core.free == len(holes) and claim(2 if holes[0] != 2 else holes[-1]) != CLAIMED
    return core, core.free


def run_batches(
    alloc: Callable[[], Any], release: Callable[[Any], Any], free: int, ops: int, overhead: int
) -> tuple[float | None, float | None, float]:
    """ns per allocation, per release (`ops` of each, in batches of up to BATCH), and per
    allocate+release cycle (timed loops of BATCH cycles: no list, which matters at 1 free
    address). Each figure is the median over its timed sections of (section - overhead) / ops
    in the section.
    """
    repeat = itertools.repeat
    batch = min(BATCH, free)
    per_alloc: list[float] = []
    per_release: list[float] = []
    done = 0
    # With one free address, allocations cannot be batched and a single call (~30 ns) is below
    # what the timer resolves: only the cycle is measured then (allocate/release are None).
    while batch > 1 and done < ops:
        t0 = _now()
        got = [alloc() for _ in repeat(None, batch)]
        t1 = _now()
        for item in got:
            release(item)
        t2 = _now()
        del got, item  # freed here, not inside the next batch's allocate section
        per_alloc.append((t1 - t0 - overhead) / batch)
        per_release.append((t2 - t1 - overhead) / batch)
        done += batch
    per_cycle: list[float] = []
    for _ in range(max(1, min(ops, 20_000) // BATCH)):
        t0 = _now()
        for _ in repeat(None, BATCH):
            release(alloc())
        t1 = _now()
        per_cycle.append((t1 - t0 - overhead) / BATCH)
    median = statistics.median
    if batch == 1:
        return None, None, median(per_cycle)
    return median(per_alloc), median(per_release), median(per_cycle)


Timing = tuple[float | None, float | None, float]  # ns per allocate, per release, per cycle


def bench_bitmap(bm: Any, free: int, ops: int, overhead: int) -> Timing:
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


def bench_core(core: Any, free: int, ops: int, overhead: int) -> Timing:
    """RangeAllocator's own bound methods: `allocate()` and `release(i)`."""
    return run_batches(core.allocate, core.release, free, ops, overhead)


def bench_allocator(
    core: Any, net: IPv4Network, free: int, ops: int, overhead: int
) -> tuple[float | None, float | None, float]:
    """AddressAllocator over the prepared RangeAllocator (handed in through `range_allocator`)."""
    gw = IPv4Address(int(net.network_address) + 1)
    allocator = AddressAllocator(net, gw, range_allocator=lambda *_: core)
    return run_batches(allocator.allocate, allocator.release, free, ops, overhead)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here as a JSON list")
    parser.add_argument("--ops", type=int, default=50_000, help="operations per measurement")
    args = parser.parse_args(argv)
    impls: list[tuple[str, Any]] = [("pure", pure_bitmap)]
    if fast_bitmap is not None:
        impls.insert(0, ("cython", fast_bitmap))
    else:
        print("warning: _fast.bitmap is not built; measuring the pure twin only", file=sys.stderr)
    overhead = timer_overhead()
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for subnet in SUBNETS:
        net = IPv4Network(subnet)
        for fill_name, fill in FILLS:
            for impl, module in impls:
                t0 = time.perf_counter()
                bm, free = build(module.Bitmap, net.num_addresses, fill)
                core, core_free = build_core(module.RangeAllocator, net.num_addresses, fill)
                assert core_free == free
                build_s = time.perf_counter() - t0
                measured = {
                    "bitmap": bench_bitmap(bm, free, args.ops, overhead),
                    "core": bench_core(core, free, args.ops, overhead),
                    "allocator": bench_allocator(core, net, free, args.ops, overhead),
                }
                del bm, core
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
                                "ns_per_op": None if ns is None else round(ns, 1),
                                "ops": args.ops,
                                "build_s": round(build_s, 3),
                            }
                        )
    report(results)
    floor = call_floor(overhead)
    print(
        "\nthe loop's own cost, per item (in every figure above): "
        f"empty loop {floor['empty loop']:.1f} ns, "
        f"calling a C method that does nothing (set.discard) {floor['set.discard']:.1f} ns"
    )
    print(f"total {time.perf_counter() - started:.1f} s, timer overhead {overhead} ns subtracted")
    if args.json:
        results += [
            {"level": "reference", "impl": "python", "op": op, "ns_per_op": round(ns, 1)}
            for op, ns in floor.items()
        ]
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
        py_s = f"{py:10.1f}" if py is not None else f"{'-':>10}"
        print(f"{level:<10} {subnet:<12} {fill:<6} {op:<9} {cy_s} {py_s} {ratio} {speed}")


if __name__ == "__main__":
    raise SystemExit(main())
