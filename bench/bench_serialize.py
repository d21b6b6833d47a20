"""Serialise N rules to iptables-restore text: Cython (`_fast.serialize`) vs pure twin.

    .venv/bin/python bench/bench_serialize.py [--json out.json] [--repeats 21]

The script is `transaction.full` of rendered networks (each network gives ~9 rules plus a chain
declaration), trimmed to exactly N ops, so the text is the one the agent really feeds to
iptables-restore. Prints a table and, with --json, machine-readable results (median of repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

from agent.core import policy
from agent.core.model import Network
from agent.firewall.iptables import rules, transaction
from agent.firewall.iptables import serialize as pure

SIZES = (10, 100, 1_000, 10_000)


def script_of(n_rules: int) -> transaction.Script:
    """A realistic transaction holding exactly `n_rules` rule lines (declarations aside)."""
    networks = [
        Network(
            id=f"{i:012x}" + "0" * 52,
            name=f"n{i}",
            bridge=f"br-{i:012x}",
            subnet=f"10.{i // 256 % 256}.{i % 256}.0/24",
            gateway=f"10.{i // 256 % 256}.{i % 256}.1",
        )
        for i in range(n_rules // 9 + 1)
    ]
    sections, left = [], n_rules
    for section in transaction.full(rules.render(policy.build(networks).v4)).tables:
        ops = section.ops[:left]
        left -= len(ops)
        sections.append(section._replace(ops=ops))
    return transaction.Script(tuple(sections))


def measure(
    fn: Callable[[transaction.Script], str], script: transaction.Script, repeats: int
) -> float:
    """Median wall time of one call, in milliseconds."""
    fn(script)  # warm up
    loops = max(1, 2_000 // max(1, sum(len(s.ops) for s in script.tables)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn(script)
        times.append((time.perf_counter() - start) / loops * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="write results as JSON to OUT ('-': stdout)")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    try:
        from _fast import serialize as fast
    except ImportError:
        fast = None
        print("warning: _fast.serialize is not built; pure only", file=sys.stderr)

    results = []
    print(f"{'rules':>7} {'bytes':>9} {'pure ms':>9} {'cython ms':>10} {'speed-up':>9}")
    for size in SIZES:
        script = script_of(size)
        text = pure.serialize(script)
        row = {
            "rules": size,
            "bytes": len(text),
            "pure_ms": measure(pure.serialize, script, args.repeats),
        }
        if fast is not None:
            assert fast.serialize(script) == text, "twins disagree"
            row["cython_ms"] = measure(fast.serialize, script, args.repeats)
            row["speedup"] = row["pure_ms"] / row["cython_ms"]
        results.append(row)
        cy = f"{row['cython_ms']:10.3f} {row['speedup']:8.1f}x" if fast else f"{'-':>10} {'-':>9}"
        print(f"{size:>7} {len(text):>9} {row['pure_ms']:9.3f} {cy}")

    report = {"benchmark": "serialize", "repeats": args.repeats, "results": results}
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
