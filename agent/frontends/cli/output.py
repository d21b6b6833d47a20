"""agentctl's output: exit statuses, errors on stderr, JSON and tables on stdout.

`EXITS` is the one statement of the exit statuses: the codes scripts get (`EXIT_CODES`, by
error kind) and the table `--help` prints (`epilog`) are both made from it.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` costs ~2 ms at run time; annotations are strings here
    import argparse
    from collections.abc import Callable, Iterable
    from typing import Any

#: (status, what --help says, the error kinds that end with it)
EXITS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "ok", ()),
    (1, "internal/unknown", ("internal",)),
    (2, "usage", ()),
    (3, "not found", ("not_found",)),
    (4, "conflict", ("conflict",)),
    (5, "invalid argument", ("invalid_argument",)),
    (6, "pool exhausted", ("pool_exhausted",)),
    (7, "busy", ("busy",)),
    (8, "kernel, firewall or storage failure", ("kernel", "firewall", "storage")),
    (9, "agentd unavailable", ("unavailable",)),
    (10, "protocol error", ("protocol",)),
    (11, "permission denied", ("permission",)),
)
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CODES: dict[str, int] = {kind: code for code, _, kinds in EXITS for kind in kinds}


def epilog() -> str:
    """The `--help` epilog: the exit statuses in three columns, then the socket's default."""
    cells = [f"{code:>2} {what}" for code, what, _ in EXITS]
    rows = (len(cells) + 2) // 3
    lines = ["exit status:"]
    for r in range(rows):
        row = [cells[c * rows + r] for c in range(3) if c * rows + r < len(cells)]
        lines.append("  " + "".join(cell.ljust(30) for cell in row).rstrip())
    lines.append("")
    lines.append("The socket defaults to $NETAGENT_SOCKET, else /run/netagent/agent.sock.")
    return "\n".join(lines) + "\n"


class UsageError(Exception):
    """The command line is wrong; reported on one line, exit status 2."""


def emit_json(value: Any) -> None:
    import json

    sys.stdout.write(json.dumps(value, indent=4, ensure_ascii=False) + "\n")


def print_table(headers: list[str], rows: Iterable[list[str]]) -> None:
    """Print columns aligned on their widest cell, three spaces apart, like docker."""
    table = [headers, *([str(c) if c is not None else "" for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for row in table:
        line = "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def show(args: argparse.Namespace, result: Any, human: Callable[[Any], object] | None) -> int:
    """Print `result` as JSON with --json, else through `human` (if any); exit status 0."""
    if args.json:
        emit_json(result)
    elif human is not None:
        human(result)
    return EXIT_OK


def report(exc: Any) -> int:
    """Print an AgentError on one stderr line and return its exit status."""
    message = " ".join(str(exc.message).split("\n"))
    sys.stderr.write(f"agentctl: {message}\n")
    return EXIT_CODES.get(exc.kind, 1)


def for_each(
    targets: list[str], action: Callable[[str], Any], human: Callable[[str, Any], object]
) -> tuple[int, list[Any]]:
    """Run `action` on every target, reporting failures and going on past them.

    Stops early only when agentd is unreachable. Returns the first failure's exit status
    (0 if none failed) and the results of the calls that succeeded.
    """
    from agent.core.errors import AgentError

    status, results = EXIT_OK, []
    for target in targets:
        try:
            result = action(target)
        except AgentError as exc:
            code = report(exc)
            status = status or code
            if exc.kind == "unavailable":
                break
            continue
        results.append(result)
        human(target, result)
    return status, results


def for_each_shown(args: argparse.Namespace, targets: list[str], action: Any) -> int:
    """`for_each`, printing each target done (or, with --json, the list of results)."""

    def done(target: str, _result: Any) -> None:
        if not args.json:
            sys.stdout.write(f"{target}\n")

    status, results = for_each(targets, action, done)
    if args.json:
        emit_json(results)
    return status


def network_row(item: dict[str, Any]) -> dict[str, Any]:
    """A Network from a `network.list` item (a NetworkView is accepted too)."""
    return item["network"] if "network" in item and isinstance(item["network"], dict) else item


def print_info(info: dict[str, Any]) -> None:
    special = {"pid": "PID", "uptime_s": "Uptime"}
    labels = {k: special.get(k, k.replace("_", " ").capitalize()) + ":" for k in info}
    width = max(map(len, labels.values()), default=0) + 1  # values aligned in one column
    for key, value in info.items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif key == "uptime_s":
            value = duration(float(value))
        sys.stdout.write(f"{labels[key]:<{width}}{value}\n")


def duration(seconds: float) -> str:
    """`1d2h3m4s`, the largest units first, zero units left out (seconds always shown)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return "".join([*parts, f"{secs}s"])


def print_ports(ep: dict[str, Any]) -> None:
    for m in ep.get("ports", []):
        host = m.get("host_ip") or "0.0.0.0"
        sys.stdout.write(f"{host}:{m['host_port']}->{m['container_port']}/{m['protocol']}\n")
