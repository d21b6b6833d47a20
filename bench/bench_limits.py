"""A fresh client's latency while agentd holds many idle connections (issue 17, limits).

Usage: .venv/bin/python bench/bench_limits.py [--repeats 300] [--quick] [--json PATH]

For each case, agentd runs in its own host namespace; the bench opens `held` idle connections
(connect, send nothing) and then times `--repeats` fresh clients, each a connect, one
`system.info` round trip and a close, as `agentctl` pays it (without the interpreter start).
Cases: no idle connections; idle connections below the connection limit; past it (the oldest
idle ones are closed to make room); and past it under a small open-files limit (prlimit
nofile 256: the default limit is then 128). The ratio is each case's p99 over the idle-free
p99 of the same run. There is no peer here: the comparison is agentd against itself without
idle connections, in the same run.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

from agent.frontends.jsonrpc.client import Client


def hold(path: str, n: int) -> list[socket.socket]:
    """Up to `n` connected idle sockets (a connect to a full backlog fails: not counted)."""
    held = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            continue
        held.append(s)
    return held


def fresh_clients(path: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with Client(path, timeout=30) as client:
            client.call("system.info")
        out.append(time.perf_counter() - t0)
    return out


def run_case(workdir: Path, name: str, held: int, repeats: int, prefix: list[str]) -> dict:
    agentd = c.Agentd(f"h-lim-{name}", workdir=workdir)
    try:
        if prefix:  # start under prlimit: same as Agentd.start, with the prefix
            argv0 = ["nsenter", f"--net={agentd.netns_path}", *prefix]
            log = open(agentd.log_path, "ab")  # noqa: SIM115 - handed to the child
            t0 = time.perf_counter()
            agentd.proc = subprocess.Popen(
                [*argv0, str(c.VENV_BIN / "agentd"), "--socket", agentd.socket,
                 "--state-dir", agentd.state_dir],
                stdout=log, stderr=log,
            )  # fmt: skip
            log.close()
            agentd.wait_ready(t0, 60)
        else:
            agentd.start()
        limit = None
        for line in agentd.log().splitlines():
            if '"api.listening"' in line:
                limit = json.loads(line).get("max_connections")
        sockets = hold(agentd.socket, held)
        time.sleep(0.5)
        fresh_clients(agentd.socket, 10)  # warm-up, unrecorded
        samples = fresh_clients(agentd.socket, repeats)
        evicted = sum(1 for s in sockets if _closed(s))
        for s in sockets:
            s.close()
        return {
            "held": len(sockets), "limit": limit, "evicted": evicted, **c.summarize(samples)
        }  # fmt: skip
    finally:
        agentd.close()


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    c.isolate()
    ap = c.base_parser("limits", __doc__)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 30)
    cases = [
        ("idle-0", 0, []),
        ("idle-1000", 1000, []),
        ("idle-3000", 3000, []),
        ("nofile256-idle-1000", 1000, ["prlimit", "--nofile=256:256", "--"]),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    results: dict[str, Any] = {}
    try:
        for name, held, prefix in cases:
            results[name] = run_case(workdir, name, held, args.repeats, prefix)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = results["idle-0"]["p99"]
    for r in results.values():
        r["p99_ratio"] = c.ratio(r["p99"], base)
    print(f"{args.repeats} fresh clients per case (connect + system.info + close)")
    print(
        c.table(
            ["case", "held", "limit", "closed idle", "p50 ms", "p99 ms", "p99 ratio"],
            [
                [k, v["held"], v["limit"], v["evicted"], v["p50"], v["p99"], v["p99_ratio"]]
                for k, v in results.items()
            ],
        )
    )
    c.write_json(args.json, "limits", args, results)


if __name__ == "__main__":
    main()
