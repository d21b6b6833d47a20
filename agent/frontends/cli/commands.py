"""agentctl's commands: argv in, requests to agentd, output out (one function per verb).

Each `cmd_*` sends one or a few JSON-RPC requests (`agent.frontends.jsonrpc.protocol.METHODS`)
with params from `agent.frontends.jsonrpc.client.params` and prints the result
(`agent.frontends.cli.output`); each `_args_*` adds a command's arguments. `COMMANDS` maps a
command path to both. Network options (`--opt`) are checked against the core's one table
(`agent.core.options`), so a bad one is a usage error that sends nothing.

Results this client expects (the daemon's handlers are the reference): `network.create` a
Network, `network.list` a list of Networks (NetworkViews are accepted too), `network.inspect` a
NetworkView, `network.prune` a Removed, `endpoint.connect` and `sandbox.run` an Endpoint,
`endpoint.list` a list of Endpoints, `port.publish|unpublish` an Endpoint, `system.info` an
Info, `system.ruleset` a Ruleset, `system.reconcile` a ReconcileReport; `events.subscribe`
streams Event notifications (`agentctl events --json` prints one compact JSON object per line).
"""

from __future__ import annotations

import argparse
import sys

from agent.frontends.cli import output as out

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` costs ~2 ms at run time; annotations are strings here
    from collections.abc import Callable
    from typing import Any

    Handler = Callable[[Any, argparse.Namespace], int]


# ---------------------------------------------------------------- argument conversion


def _create_options(opts: list[str], mtu: int | None) -> dict[str, str]:
    """`--opt KEY=VALUE` flags (and `--mtu`) as the request's options, checked here against
    the core's table (`agent.core.options`, imported only when there is something to check):
    a bad one is a usage error."""
    if not opts and mtu is None:
        return {}
    from agent.core import options as table
    from agent.core.errors import InvalidArgument

    found: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in table.BY_KEY:
            known = ", ".join(o.name for o in table.OPTIONS)
            raise out.UsageError(f"unknown or malformed --opt {opt!r} (known: {known})")
        found[key] = value
    if mtu is not None:
        if found.get("mtu", str(mtu)) != str(mtu):
            raise out.UsageError("--mtu and --opt mtu disagree")
        found["mtu"] = str(mtu)
    try:
        table.parse(found)
    except InvalidArgument as exc:
        raise out.UsageError(f"--opt: {exc.message}") from None
    return found


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key:
            raise out.UsageError(f"--label {pair!r}: empty key")
        labels[key] = value
    return labels


def _label_filters(filters: list[str]) -> list[str]:
    labels = []
    for flt in filters:
        key, sep, value = flt.partition("=")
        if key != "label" or not sep or not value:
            raise out.UsageError(f"unsupported filter {flt!r} (only label=KEY or label=KEY=VALUE)")
        labels.append(value)
    return labels


# ---------------------------------------------------------------- commands


def cmd_info(client: Any, args: argparse.Namespace) -> int:
    return out.show(args, client.call("system.info"), out.print_info)


def cmd_network_create(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    fields: dict[str, Any] = {}
    if options := _create_options(args.opt, args.mtu):
        fields["options"] = options
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
    if args.disable_dns:
        given = fields.get("options", {}).get("dns", "false")
        if given.strip().lower() not in ("false", "0", "no"):
            raise out.UsageError("--disable-dns and --opt dns disagree")
        fields["options"] = {**fields.get("options", {}), "dns": "false"}
    request = params("network.create", name=args.name, labels=_labels(args.label), **fields)
    result = client.call("network.create", request)
    return out.show(args, result, lambda net: sys.stdout.write(f"{net['id']}\n"))


def _per_family(name: str, values: list[str]) -> dict[str, str]:
    """`--subnet`/`--gateway` given once per family, like Docker: {name: V4, name6: V6}."""
    found: dict[str, str] = {}
    for value in values:
        key = f"{name}6" if ":" in value else name
        if key in found:
            family = "IPv6" if key.endswith("6") else "IPv4"
            raise out.UsageError(f"--{name} given twice for {family}: {found[key]} and {value}")
        found[key] = value
    return found


def cmd_network_ls(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    request = params("network.list", labels=_label_filters(args.filter))
    result = client.call("network.list", request)
    if args.json:
        out.emit_json(result)
        return out.EXIT_OK
    nets = sorted((out.network_row(n) for n in result), key=lambda n: n["name"])
    if args.quiet:
        sys.stdout.writelines(f"{n['id'][:12]}\n" for n in nets)
        return out.EXIT_OK
    headers = ["NETWORK ID", "NAME", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE"]
    rows = (
        [n["id"][:12], n["name"], "bridge", n["subnet"], n["gateway"], n["bridge"]] for n in nets
    )
    out.print_table(headers, rows)
    return out.EXIT_OK


def cmd_network_inspect(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    def inspect(ref: str) -> Any:
        return client.call("network.inspect", params("network.inspect", network=ref))

    status, results = out.for_each(args.network, inspect, lambda _ref, _res: None)
    out.emit_json(results)
    return status


def cmd_network_rm(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    def remove(ref: str) -> Any:
        request = params("network.remove", network=ref, force=args.force)
        return client.call("network.remove", request)

    return out.for_each_shown(args, args.network, remove)


def cmd_network_prune(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    request = params("network.prune", labels=_label_filters(args.filter))
    if not args.force and not _confirm(
        "WARNING! This will remove all networks not used by at least one endpoint."
    ):
        return out.EXIT_OK
    result = client.call("network.prune", request)
    return out.show(
        args, result, lambda res: sys.stdout.writelines(f"{n}\n" for n in res["removed"])
    )


def _confirm(warning: str) -> bool:
    sys.stderr.write(f"{warning}\nAre you sure you want to continue? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_network_connect(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    request = params(
        "endpoint.connect", network=args.network, netns=args.netns, ip=args.ip, mac=args.mac,
        ports=args.publish, ip6=args.ip6, aliases=args.alias,
    )  # fmt: skip
    return out.show(args, client.call("endpoint.connect", request), None)


def cmd_network_disconnect(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    request = params(
        "endpoint.disconnect", network=args.network, netns=args.netns, force=args.force
    )
    return out.show(args, client.call("endpoint.disconnect", request), None)


def cmd_run(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    extra = {"network": args.network} if args.network is not None else {}
    request = params(
        "sandbox.run", name=args.name, ip=args.ip, mac=args.mac, ports=args.publish,
        ip6=args.ip6, dns_name=args.dns_name, aliases=args.alias, dns=args.dns, **extra,
    )  # fmt: skip
    result = client.call("sandbox.run", request)
    return out.show(args, result, lambda ep: sys.stdout.write(f"{ep['ip']}\n"))


def cmd_rm(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    def remove(name: str) -> Any:
        return client.call("sandbox.remove", params("sandbox.remove", name=name))

    return out.for_each_shown(args, args.name, remove)


def cmd_ps(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    endpoints = client.call("endpoint.list", params("endpoint.list", network=args.network))
    if args.json:
        out.emit_json(endpoints)
        return out.EXIT_OK
    nets = (out.network_row(n) for n in client.call("network.list", params("network.list")))
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
    out.print_table(headers, rows)
    return out.EXIT_OK


def cmd_events(client: Any, args: argparse.Namespace) -> int:
    """Stream events until interrupted, one line each (JSON lines with --json)."""
    import json
    import time

    from agent.frontends.jsonrpc.client import params

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
        return out.EXIT_OK
    return out.EXIT_OK


def cmd_reconcile(client: Any, args: argparse.Namespace) -> int:
    def human(res: dict[str, Any]) -> None:
        for line in res["repaired"]:
            sys.stdout.write(f"repaired: {line}\n")
        if not res["repaired"]:
            sys.stdout.write("nothing to repair\n")

    return out.show(args, client.call("system.reconcile"), human)


def _args_events(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--type", action="append", choices=("network", "endpoint", "repair"),
        help="only events of this type (repeatable)",
    )  # fmt: skip


def cmd_port(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.jsonrpc.client import params

    method = f"port.{args.verb}"
    request = params(method, netns=args.netns, ports=args.spec, network=args.network)
    return out.show(args, client.call(method, request), out.print_ports)


def cmd_ruleset(client: Any, args: argparse.Namespace) -> int:
    return out.show(args, client.call("system.ruleset"), lambda res: sys.stdout.write(res["text"]))


def _args_network_create(p: argparse.ArgumentParser) -> None:
    family = "once per address family (IPv4, IPv6)"
    p.add_argument("--subnet", metavar="CIDR", action="append", default=[], help=family)
    p.add_argument("--gateway", metavar="IP", action="append", default=[], help=family)
    p.add_argument("--ipv6", action="store_true", help="dual stack: an IPv6 subnet too")
    p.add_argument("--ip-range", metavar="CIDR", dest="ip_range")
    p.add_argument("--internal", action="store_true", help="no traffic out of the network")
    opt_help = "icc=BOOL, ip-masquerade=BOOL, bridge=NAME, mtu=N (or Docker's names)"
    p.add_argument("--opt", "-o", metavar="KEY=VALUE", action="append", default=[], help=opt_help)
    p.add_argument("--mtu", metavar="N", type=int)
    p.add_argument("--label", metavar="KEY=VALUE", action="append", default=[])
    p.add_argument(
        "--aux-address", metavar="NAME=IP", action="append", default=[], dest="aux_address"
    )
    p.add_argument(
        "--disable-dns", action="store_true", help="no names answered on the gateway (opt dns)"
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
        _args_alias(p)
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
    p.add_argument("--name", dest="dns_name", metavar="DNSNAME",
                   help="its DNS name on the network (default: NAME)")  # fmt: skip
    _args_alias(p)
    p.add_argument("--dns", metavar="IP", action="append", default=[],
                   help="its resolv.conf's nameserver (repeatable; default: gateway)")  # fmt: skip
    p.add_argument("name", metavar="NAME")


def _args_alias(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", metavar="NAME", action="append", default=[],
                   help="another DNS name on the network (repeatable)")  # fmt: skip


def _positionals(metavar: str) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument(metavar.lower(), metavar=metavar, nargs="+")

    return configure


def _args_ps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", metavar="NET", help="only endpoints of this network")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


def cmd_cni_install(client: Any, args: argparse.Namespace) -> int:
    from agent.frontends.cli import cni  # only for this command

    return cni.cmd_cni_install(client, args)


def _args_cni_install(p: argparse.ArgumentParser) -> None:
    from agent.frontends.cli import cni

    cni.args_cni_install(p)


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
    ("cni", "install"): (
        cmd_cni_install,
        "write the CNI plugin and a conflist for a network",
        _args_cni_install,
    ),
}
