"""agentctl: the thin, fast command-line client of agentd (Docker-like subcommands).

Each command sends one or a few JSON-RPC requests (`agent.api.protocol.METHODS`) over agentd's
Unix socket and prints a human table by default, or the raw result as JSON with `--json`.

Import budget (the issue's target is 40 ms a command, ~25 of which the interpreter takes):
stdlib (argparse, json) and `agent.api.client` / `agent.core.errors` only, loaded lazily so that
`--help` and usage errors cost nothing. Not msgspec nor `agent.api.protocol` (~14 ms to import):
params are plain dicts from `agent.api.client.params`, checked against the protocol by the tests.

Results this client expects (the daemon's handlers are the reference): `network.create` a
Network, `network.list` a list of Networks (NetworkViews are accepted too), `network.inspect` a
NetworkView, `network.prune` a Removed, `endpoint.connect` and `sandbox.run` an Endpoint,
`endpoint.list` a list of Endpoints, `port.publish|unpublish` an Endpoint, `system.info` an
Info, `system.ruleset` a Ruleset, `system.reconcile` a ReconcileReport; `events.subscribe`
streams Event notifications (`agentctl events --json` prints one compact JSON object per line).

Errors go to stderr as one line, ``agentctl: <message>``, and the exit status tells scripts
what happened:

    0   ok                  5   invalid_argument     9   unavailable (agentd not reachable)
    1   internal / unknown  6   pool_exhausted      10   protocol (bad request or response)
    2   usage               7   busy
    3   not_found           8   kernel, firewall
    4   conflict
"""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` costs ~2 ms at run time; annotations are strings here
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

    Handler = Callable[[Any, argparse.Namespace], int]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CODES: dict[str, int] = {
    "internal": 1,
    "not_found": 3,
    "conflict": 4,
    "invalid_argument": 5,
    "pool_exhausted": 6,
    "busy": 7,
    "kernel": 8,
    "firewall": 8,
    "unavailable": 9,
    "protocol": 10,
}

EPILOG = """\
exit status:
  0 ok                 4 conflict           8 kernel or firewall failure
  1 internal/unknown   5 invalid argument   9 agentd unavailable
  2 usage              6 pool exhausted    10 protocol error
  3 not found          7 busy

The socket defaults to $NETAGENT_SOCKET, else /run/netagent/agent.sock.
"""

# --opt keys of `network create`: short name or Docker's long name -> NetworkCreate field.
OPTIONS: dict[str, str] = {
    "icc": "icc",
    "com.docker.network.bridge.enable_icc": "icc",
    "ip-masquerade": "masquerade",
    "com.docker.network.bridge.enable_ip_masquerade": "masquerade",
    "bridge": "bridge",
    "com.docker.network.bridge.name": "bridge",
    "mtu": "mtu",
    "com.docker.network.driver.mtu": "mtu",
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class UsageError(Exception):
    """The command line is wrong; reported on one line, exit status 2."""


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
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- output helpers


def _emit_json(value: Any) -> None:
    import json

    sys.stdout.write(json.dumps(value, indent=4, ensure_ascii=False) + "\n")


def _print_table(headers: list[str], rows: Iterable[list[str]]) -> None:
    """Print columns aligned on their widest cell, three spaces apart, like docker."""
    table = [headers, *([str(c) if c is not None else "" for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for row in table:
        line = "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def _show(args: argparse.Namespace, result: Any, human: Callable[[Any], object] | None) -> int:
    """Print `result` as JSON with --json, else through `human` (if any); exit status 0."""
    if args.json:
        _emit_json(result)
    elif human is not None:
        human(result)
    return EXIT_OK


def _report(exc: Any) -> int:
    """Print an AgentError on one stderr line and return its exit status."""
    message = " ".join(str(exc.message).split("\n"))
    sys.stderr.write(f"agentctl: {message}\n")
    return EXIT_CODES.get(exc.kind, 1)


def _for_each(
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
            code = _report(exc)
            status = status or code
            if exc.kind == "unavailable":
                break
            continue
        results.append(result)
        human(target, result)
    return status, results


def _network_row(item: dict[str, Any]) -> dict[str, Any]:
    return item["network"] if "network" in item and isinstance(item["network"], dict) else item


# ---------------------------------------------------------------- argument conversion


def _parse_bool(key: str, value: str) -> bool:
    try:
        return _BOOLS[value.lower()]
    except KeyError:
        raise UsageError(f"--opt {key}: expected true or false, got {value!r}") from None


def _parse_int(what: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{what}: expected an integer, got {value!r}") from None


def _create_options(opts: list[str]) -> dict[str, Any]:
    """Turn `--opt KEY=VALUE` flags into NetworkCreate fields."""
    fields: dict[str, Any] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        field = OPTIONS.get(key)
        if not sep or field is None:
            known = ", ".join(k for k in OPTIONS if "." not in k)
            raise UsageError(f"unknown or malformed --opt {opt!r} (known: {known})")
        if field in ("icc", "masquerade"):
            fields[field] = _parse_bool(key, value)
        elif field == "mtu":
            fields[field] = _parse_int(f"--opt {key}", value)
        else:
            fields[field] = value
    return fields


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key:
            raise UsageError(f"--label {pair!r}: empty key")
        labels[key] = value
    return labels


def _label_filters(filters: list[str]) -> list[str]:
    labels = []
    for flt in filters:
        key, sep, value = flt.partition("=")
        if key != "label" or not sep or not value:
            raise UsageError(f"unsupported filter {flt!r} (only label=KEY or label=KEY=VALUE)")
        labels.append(value)
    return labels


# ---------------------------------------------------------------- commands


def cmd_info(client: Any, args: argparse.Namespace) -> int:
    return _show(args, client.call("system.info"), _print_info)


def _print_info(info: dict[str, Any]) -> None:
    special = {"pid": "PID", "uptime_s": "Uptime"}
    labels = {k: special.get(k, k.replace("_", " ").capitalize()) + ":" for k in info}
    width = max(map(len, labels.values()), default=0) + 1  # values aligned in one column
    for key, value in info.items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif key == "uptime_s":
            value = _duration(float(value))
        sys.stdout.write(f"{labels[key]:<{width}}{value}\n")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return "".join([*parts, f"{secs}s"])


def cmd_network_create(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    fields = _create_options(args.opt)
    if args.mtu is not None:
        if fields.get("mtu", args.mtu) != args.mtu:
            raise UsageError("--mtu and --opt mtu disagree")
        fields["mtu"] = args.mtu
    for name in ("subnet", "gateway"):
        fields |= _per_family(name, getattr(args, name))
    if args.ip_range is not None:
        fields["ip_range"] = args.ip_range
    if args.ipv6:
        fields["ipv6"] = True
    if args.internal:
        fields["internal"] = True
    if args.aux_address:
        fields["aux_addresses"] = _labels(args.aux_address)
    request = params("network.create", name=args.name, labels=_labels(args.label), **fields)
    result = client.call("network.create", request)
    return _show(args, result, lambda net: sys.stdout.write(f"{net['id']}\n"))


def _per_family(name: str, values: list[str]) -> dict[str, str]:
    """`--subnet`/`--gateway` given once per family, like Docker: {name: V4, name6: V6}."""
    found: dict[str, str] = {}
    for value in values:
        key = f"{name}6" if ":" in value else name
        if key in found:
            family = "IPv6" if key.endswith("6") else "IPv4"
            raise UsageError(f"--{name} given twice for {family}: {found[key]} and {value}")
        found[key] = value
    return found


def cmd_network_ls(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    request = params("network.list", labels=_label_filters(args.filter))
    result = client.call("network.list", request)
    if args.json:
        _emit_json(result)
        return EXIT_OK
    nets = sorted((_network_row(n) for n in result), key=lambda n: n["name"])
    if args.quiet:
        sys.stdout.writelines(f"{n['id'][:12]}\n" for n in nets)
        return EXIT_OK
    headers = ["NETWORK ID", "NAME", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE"]
    rows = (
        [n["id"][:12], n["name"], "bridge", n["subnet"], n["gateway"], n["bridge"]] for n in nets
    )
    _print_table(headers, rows)
    return EXIT_OK


def cmd_network_inspect(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    def inspect(ref: str) -> Any:
        return client.call("network.inspect", params("network.inspect", network=ref))

    status, results = _for_each(args.network, inspect, lambda _ref, _res: None)
    _emit_json(results)
    return status


def cmd_network_rm(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    def remove(ref: str) -> Any:
        request = params("network.remove", network=ref, force=args.force)
        return client.call("network.remove", request)

    return _for_each_shown(args, args.network, remove)


def cmd_network_prune(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    request = params("network.prune", labels=_label_filters(args.filter))
    if not args.force and not _confirm(
        "WARNING! This will remove all networks not used by at least one endpoint."
    ):
        return EXIT_OK
    result = client.call("network.prune", request)
    return _show(args, result, lambda res: sys.stdout.writelines(f"{n}\n" for n in res["removed"]))


def _confirm(warning: str) -> bool:
    sys.stderr.write(f"{warning}\nAre you sure you want to continue? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_network_connect(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    request = params(
        "endpoint.connect", network=args.network, netns=args.netns, ip=args.ip, mac=args.mac,
        ports=args.publish, ip6=args.ip6,
    )  # fmt: skip
    return _show(args, client.call("endpoint.connect", request), None)


def cmd_network_disconnect(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    request = params(
        "endpoint.disconnect", network=args.network, netns=args.netns, force=args.force
    )
    return _show(args, client.call("endpoint.disconnect", request), None)


def cmd_run(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    extra = {"network": args.network} if args.network is not None else {}
    request = params(
        "sandbox.run", name=args.name, ip=args.ip, mac=args.mac, ports=args.publish,
        ip6=args.ip6, **extra,
    )  # fmt: skip
    result = client.call("sandbox.run", request)
    return _show(args, result, lambda ep: sys.stdout.write(f"{ep['ip']}\n"))


def cmd_rm(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    def remove(name: str) -> Any:
        return client.call("sandbox.remove", params("sandbox.remove", name=name))

    return _for_each_shown(args, args.name, remove)


def _for_each_shown(args: argparse.Namespace, targets: list[str], action: Any) -> int:
    """`_for_each`, printing each target done (or, with --json, the list of results)."""

    def done(target: str, _result: Any) -> None:
        if not args.json:
            sys.stdout.write(f"{target}\n")

    status, results = _for_each(targets, action, done)
    if args.json:
        _emit_json(results)
    return status


def cmd_ps(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    endpoints = client.call("endpoint.list", params("endpoint.list", network=args.network))
    if args.json:
        _emit_json(endpoints)
        return EXIT_OK
    nets = (_network_row(n) for n in client.call("network.list", params("network.list")))
    names = {n["id"]: n["name"] for n in nets}
    headers = ["NETNS", "NETWORK", "IFNAME", "IP", "MAC", "HOST IFNAME"]
    rows = (
        [
            ep.get("sandbox") or ep["netns"].removeprefix("/run/netns/"),
            names.get(ep["network_id"], ep["network_id"][:12]),
            ep["ifname"],
            ep["ip"],
            ep["mac"],
            ep["host_ifname"],
        ]
        for ep in endpoints
    )
    _print_table(headers, rows)
    return EXIT_OK


def cmd_events(client: Any, args: argparse.Namespace) -> int:
    """Stream events until interrupted, one line each (JSON lines with --json)."""
    import json
    import time

    from agent.api.client import params

    request = params("events.subscribe", types=args.type or [])
    try:
        for ev in client.stream("events.subscribe", request):
            if args.json:  # JSON lines: one compact object per event
                sys.stdout.write(json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n")
            else:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ev["time"]))
                attrs = ", ".join(f"{k}={v}" for k, v in sorted(ev["attributes"].items()))
                sys.stdout.write(f"{stamp} {ev['type']} {ev['action']} {ev['id'][:12]} ({attrs})\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def cmd_reconcile(client: Any, args: argparse.Namespace) -> int:
    def human(res: dict[str, Any]) -> None:
        for line in res["repaired"]:
            sys.stdout.write(f"repaired: {line}\n")
        if not res["repaired"]:
            sys.stdout.write("nothing to repair\n")

    return _show(args, client.call("system.reconcile"), human)


def _args_events(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--type", action="append", choices=("network", "endpoint", "repair"),
        help="only events of this type (repeatable)",
    )  # fmt: skip


def cmd_port(client: Any, args: argparse.Namespace) -> int:
    from agent.api.client import params

    method = f"port.{args.verb}"
    request = params(method, netns=args.netns, ports=args.spec, network=args.network)
    return _show(args, client.call(method, request), _print_ports)


def _print_ports(ep: dict[str, Any]) -> None:
    for m in ep.get("ports", []):
        host = m.get("host_ip") or "0.0.0.0"
        sys.stdout.write(f"{host}:{m['host_port']}->{m['container_port']}/{m['protocol']}\n")


def cmd_ruleset(client: Any, args: argparse.Namespace) -> int:
    return _show(args, client.call("system.ruleset"), lambda res: sys.stdout.write(res["text"]))


# ---------------------------------------------------------------- parser and entry point


def _args_network_create(p: argparse.ArgumentParser) -> None:
    family = "once per address family (IPv4, IPv6)"
    p.add_argument("--subnet", metavar="CIDR", action="append", default=[], help=family)
    p.add_argument("--gateway", metavar="IP", action="append", default=[], help=family)
    p.add_argument("--ipv6", action="store_true", help="dual stack: an IPv6 subnet too")
    p.add_argument("--ip-range", metavar="CIDR", dest="ip_range")
    p.add_argument("--internal", action="store_true", help="no traffic out of the network")
    opt_help = "icc=BOOL, ip-masquerade=BOOL, bridge=NAME, mtu=N"
    p.add_argument("--opt", "-o", metavar="KEY=VALUE", action="append", default=[], help=opt_help)
    p.add_argument("--mtu", metavar="N", type=int)
    p.add_argument("--label", metavar="KEY=VALUE", action="append", default=[])
    p.add_argument(
        "--aux-address", metavar="NAME=IP", action="append", default=[], dest="aux_address"
    )
    p.add_argument("name", metavar="NAME")


def _args_network_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", "-f", metavar="label=K[=V]", action="append", default=[])
    p.add_argument("--quiet", "-q", action="store_true", help="only show network IDs")


def _args_network_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", "-f", action="store_true", help="disconnect endpoints first")
    p.add_argument("network", metavar="NETWORK", nargs="+")


def _args_network_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", metavar="label=K[=V]", action="append", default=[])
    p.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")


PUBLISH_HELP = "publish a port: [HOST_IP:]HOST_PORT[-END]:PORT[-END][/tcp|udp] (repeatable)"


def _args_publish(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--publish", "-p", metavar="SPEC", action="append", default=[], help=PUBLISH_HELP
    )


def _args_port(p: argparse.ArgumentParser) -> None:
    p.set_defaults(verb=p.prog.rsplit(" ", 1)[-1])
    p.add_argument("--network", metavar="NET", help="the endpoint's network, if several")
    p.add_argument("netns", metavar="NETNS", help="name under /run/netns, or a path")
    p.add_argument("spec", metavar="SPEC", nargs="+", help="[HOST_IP:]HOST_PORT:PORT[/tcp|udp]")


def _args_connect(p: argparse.ArgumentParser) -> None:
    if p.prog.endswith(" connect"):
        p.add_argument("--ip", help="IPv4 address to use")
        p.add_argument("--ip6", help="IPv6 address to use (IPv6 networks)")
        p.add_argument("--mac", help="MAC address to use")
        _args_publish(p)
    else:
        p.add_argument("--force", "-f", action="store_true")
    p.add_argument("network", metavar="NETWORK")
    p.add_argument("netns", metavar="NETNS", help="name under /run/netns, or a path")


def _args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", metavar="NET", help="network to join (default: bridge)")
    p.add_argument("--ip", help="IPv4 address to use")
    p.add_argument("--ip6", help="IPv6 address to use (IPv6 networks)")
    p.add_argument("--mac", help="MAC address to use")
    _args_publish(p)
    p.add_argument("name", metavar="NAME")


def _positionals(metavar: str) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument(metavar.lower(), metavar=metavar, nargs="+")

    return configure


def _args_ps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", metavar="NET", help="only endpoints of this network")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


# command path -> (handler, help, adds the command's arguments)
COMMANDS: dict[tuple[str, ...], tuple[Handler, str, Callable[[argparse.ArgumentParser], None]]] = {
    ("info",): (cmd_info, "show the daemon's state", _no_args),
    ("network", "create"): (cmd_network_create, "create a network", _args_network_create),
    ("network", "ls"): (cmd_network_ls, "list networks", _args_network_ls),
    ("network", "inspect"): (
        cmd_network_inspect,
        "show networks and their endpoints as JSON",
        _positionals("NETWORK"),
    ),
    ("network", "rm"): (cmd_network_rm, "remove networks", _args_network_rm),
    ("network", "prune"): (
        cmd_network_prune,
        "remove networks without endpoints",
        _args_network_prune,
    ),
    ("network", "connect"): (cmd_network_connect, "attach a namespace", _args_connect),
    ("network", "disconnect"): (cmd_network_disconnect, "detach a namespace", _args_connect),
    ("run",): (cmd_run, "create a named namespace attached to a network", _args_run),
    ("rm",): (cmd_rm, "remove namespaces created by run", _positionals("NAME")),
    ("ps",): (cmd_ps, "list endpoints", _args_ps),
    ("port", "publish"): (cmd_port, "publish ports of an endpoint", _args_port),
    ("port", "unpublish"): (cmd_port, "unpublish ports of an endpoint", _args_port),
    ("ruleset",): (cmd_ruleset, "print the firewall ruleset the agent maintains", _no_args),
    ("events",): (cmd_events, "stream network, endpoint and repair events", _args_events),
    ("reconcile",): (cmd_reconcile, "check links and rules now; print what was repaired", _no_args),
}


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
            if words[0] not in ("network", "port") or len(words) == 2:
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
        epilog=EPILOG,
    )
    top.add_argument("--socket", metavar="PATH", help="agentd's control socket")
    top.add_argument("--json", action="store_true", help="print the raw result as JSON")
    cmds = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for path, (func, help_, configure) in COMMANDS.items():
        if selected in COMMANDS and path != selected:
            continue
        group = cmds
        if len(path) == 2:
            if path[0] not in groups:
                net = cmds.add_parser(path[0], help=f"manage {path[0]}s")
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
    except UsageError as exc:
        sys.stderr.write(f"agentctl: {exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        return _run(args)
    except UsageError as exc:
        sys.stderr.write(f"agentctl: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `agentctl network ls | head`: stop quietly; keep Python from complaining at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from agent.api.client import Client
    from agent.core.errors import AgentError

    with Client(args.socket) as client:
        try:
            return args.func(client, args)
        except AgentError as exc:
            return _report(exc)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            sys.stderr.write(f"agentctl: unexpected result from agentd: {exc!r}\n")
            return EXIT_CODES["protocol"]


if __name__ == "__main__":
    sys.exit(main())
