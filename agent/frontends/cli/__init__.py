"""agentctl: the thin, fast command-line client of agentd (Docker-like subcommands).

Each command sends one or a few JSON-RPC requests over agentd's Unix socket and prints a human
table by default, or the raw result as JSON with `--json` (`commands` holds the verbs,
`output` the printing and the exit statuses, `output.EXITS`).

Import budget (40 ms a command, ~25 of which the interpreter takes): stdlib (argparse, json)
and `agent.frontends.jsonrpc.client` / `agent.core.errors` / `agent.core.options` only, loaded
lazily so that `--help` and usage errors cost nothing. Not msgspec nor the protocol module
(~14 ms to import): params are plain dicts from `client.params`, checked against the protocol
by the tests.

Errors go to stderr as one line, ``agentctl: <message>``, and the exit status tells scripts
what happened (`agentctl --help` lists them).
"""

from __future__ import annotations

import argparse
import sys

from agent.frontends.cli import commands
from agent.frontends.cli import output as out

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` costs ~2 ms at run time; annotations are strings here
    from typing import Any, NoReturn

__all__ = ["build_parser", "main"]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help formatter that sizes itself without `shutil` (whose import costs ~3 ms)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:  # fmt: skip
        if width is None:
            width = _terminal_width() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_width() -> int:
    import os

    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise out.UsageError(f"{message} (see '{self.prog} --help')")


def _selected(argv: list[str]) -> tuple[str, ...]:
    """The command path argv names (e.g. ("network", "create")), read without a parser.

    Lets `build_parser` add arguments to that command only: argparse spends most of its time
    building parsers, and agentctl runs once per command.
    """
    words: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--socket":
            skip = True
        elif not token.startswith("-"):
            words.append(token)
            if words[0] not in ("network", "port", "cni") or len(words) == 2:
                break
    return tuple(words)


def build_parser(selected: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The command line; every command carries its handler in `func`.

    Args:
        selected: the command path argv names. When it names a whole command, only that
            command's parser is built (a typo or `--help` higher up gets the whole tree);
            None builds everything.
    """
    common = _Parser(add_help=False)
    hide = argparse.SUPPRESS  # unset unless given here: the global option's value stands
    common.add_argument("--json", action="store_true", default=hide, help="raw result as JSON")
    common.add_argument("--socket", metavar="PATH", default=hide, help="agentd's control socket")
    top = _Parser(
        prog="agentctl",
        description="Control netagent's bridge networks.",
        epilog=out.epilog(),
    )
    top.add_argument("--socket", metavar="PATH", help="agentd's control socket")
    top.add_argument("--json", action="store_true", help="print the raw result as JSON")
    cmds = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for path, (func, help_, configure) in commands.COMMANDS.items():
        if selected in commands.COMMANDS and path != selected:
            continue
        group = cmds
        if len(path) == 2:
            if path[0] not in groups:
                group_help = "set up the CNI plugin" if path[0] == "cni" else f"manage {path[0]}s"
                net = cmds.add_parser(path[0], help=group_help)
                groups[path[0]] = net.add_subparsers(metavar="COMMAND", required=True)
            group = groups[path[0]]
        wanted = selected is None or selected == path
        parser = group.add_parser(
            path[-1],
            help=help_,
            description=help_,
            parents=[common] if wanted else [],
        )
        parser.set_defaults(func=func)
        if wanted:
            configure(parser)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one agentctl command and return its exit status (see the module docstring)."""
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(_selected(argv)).parse_args(argv)
    except out.UsageError as exc:
        sys.stderr.write(f"agentctl: {exc}\n")
        return out.EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else out.EXIT_OK
    try:
        return _run(args)
    except out.UsageError as exc:
        sys.stderr.write(f"agentctl: {exc}\n")
        return out.EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `agentctl network ls | head`: stop quietly; keep Python from complaining at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return out.EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from agent.core.errors import AgentError
    from agent.frontends.jsonrpc.client import Client

    with Client(args.socket) as client:
        try:
            status: int = args.func(client, args)
            return status
        except AgentError as exc:
            return out.report(exc)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            sys.stderr.write(f"agentctl: unexpected result from agentd: {exc!r}\n")
            return out.EXIT_CODES["protocol"]


if __name__ == "__main__":
    sys.exit(main())
