"""Wall time of agentctl commands, as a user or a script pays it (fork, exec, Python start-up).

Usage: .venv/bin/python bench/bench_cli.py [--repeats 30] [--quick] [--json PATH]

agentd runs in its own host namespace with a small, realistic state (`--networks` extra
networks, `--endpoints` endpoints), so `network ls` and `ps` print real tables. Each command is
the venv's `agentctl --socket S ...`, run `--repeats` times, interleaved (one of each, then
again). `network create` / `network rm` alternate on the same name, so every create is followed
by its rm. The venv interpreter doing nothing (`python -c pass`, and with `-I -S`) is measured
alongside as the floor of any Python CLI.

Bytecode: an installed package has `.pyc` files; a source tree run with
PYTHONDONTWRITEBYTECODE=1 (as in this project's sandbox) recompiles every `agent` module on
each run (~10 ms for agentctl's). Set PYTHONPYCACHEPREFIX=DIR and unset PYTHONDONTWRITEBYTECODE
to measure the installed case; the variables in effect are printed and saved with the results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

from agent.frontends.jsonrpc import protocol as p

BYTECODE_ENV = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONPATH")


def commands(sock: str) -> dict[str, list[str]]:
    ctl = [str(c.VENV_BIN / "agentctl"), "--socket", sock]
    py = str(c.VENV_BIN / "python")
    return {
        "python -c pass": [py, "-c", "pass"],
        "python -I -S -c pass": [py, "-I", "-S", "-c", "pass"],
        "agentctl info": [*ctl, "info"],
        "agentctl network ls": [*ctl, "network", "ls"],
        "agentctl ps": [*ctl, "ps"],
        "agentctl network create": [*ctl, "network", "create", "clibench"],
        "agentctl network rm": [*ctl, "network", "rm", "clibench"],
    }


def run_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr[:300]!r}")
    return elapsed


def populate(agentd: c.Agentd, networks: int, endpoints: int) -> None:
    client = agentd.client()
    for i in range(networks):
        client.call("network.create", p.NetworkCreate(name=f"n{i}", labels={"team": "ci"}))
    names = [f"cl{i}" for i in range(endpoints)]
    c.add_netns(names)
    for i, name in enumerate(names):
        client.call(
            "endpoint.connect", c.connect_params(f"n{i % max(1, networks)}", f"/run/netns/{name}")
        )


def main() -> None:
    c.isolate()
    ap = c.base_parser("cli", __doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--networks", type=int, default=5)
    ap.add_argument("--endpoints", type=int, default=10)
    args = ap.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 5)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    agentd = c.Agentd("h-cli", "--pool", "10.200.0.0/16:24", workdir=workdir)
    samples: dict[str, list[float]] = {}
    try:
        agentd.start()
        populate(agentd, args.networks, args.endpoints)
        cmds = commands(agentd.socket)
        for argv in cmds.values():  # warm the page cache, unrecorded
            run_once(argv)
        for _ in range(args.repeats):
            for name, argv in cmds.items():
                samples.setdefault(name, []).append(run_once(argv))
    finally:
        agentd.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {k: c.summarize(v) for k, v in samples.items()}
    conditions = {k: os.environ.get(k) for k in BYTECODE_ENV}
    print(
        f"{args.repeats} repeats; agentd with {args.networks + 1} networks, "
        f"{args.endpoints} endpoints; {conditions}"
    )
    print(
        c.table(
            ["command (ms)", "median", "p90", "mean", "min", "max"],
            [[k, v["p50"], v["p90"], v["mean"], v["min"], v["max"]] for k, v in results.items()],
        )
    )
    c.write_json(args.json, "cli", args, {"conditions": conditions, **results})


if __name__ == "__main__":
    main()
