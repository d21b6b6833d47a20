"""Published ports: parse `-p` specs, expand ranges, refuse collisions (pure).

A spec is Docker's `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|udp]`. A range maps
port to port (8000-8002:80-82 is 8000->80, 8001->81, 8002->82) and is stored as one
`PortMapping` per port: that is what the DNAT rules and the conntrack flush work on.

Two mappings collide when they share protocol and host port and their host addresses overlap
(equal, or either is "every local address"): like two sockets bound to 0.0.0.0:80 and
127.0.0.1:80, only one of them could receive the traffic.

An IPv6 host address is written in brackets, as Docker does: `[fd00::1]:8080:80`. It applies to
IPv6 only (an IPv4 host address to IPv4 only; none to both); `[::]` is refused, since the empty
host address already means every local address of both families.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from agent.core.errors import Conflict, InvalidArgument
from agent.core.model import PortMapping

PROTOCOLS = ("tcp", "udp")
MAX_RANGE = 1024  # ports in one spec: each is a DNAT, a filter and a hairpin rule


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidArgument(
            f"invalid port {text!r} in {spec!r}: ports are integers from 1 to 65535",
            field="ports",
            spec=spec,
        )
    return int(text)


def _range(text: str, spec: str) -> range:
    first, dash, last = text.partition("-")
    start = _port(first, spec)
    end = _port(last, spec) if dash else start
    if end < start:
        raise InvalidArgument(f"invalid port range {text!r} in {spec!r}", field="ports", spec=spec)
    return range(start, end + 1)


def _host_ip(text: str, spec: str) -> str:
    if text in ("", "0.0.0.0"):
        return ""
    try:
        if text.startswith("[") and text.endswith("]"):
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(text[1:-1])
        else:
            ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidArgument(
            f"invalid host address {text!r} in {spec!r}: expected an IPv4 address or an IPv6 "
            "address in brackets",
            field="ports",
            spec=spec,
        ) from None
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidArgument(f"host address {text} cannot receive connections", spec=spec)
    return str(ip)


def parse(spec: str) -> list[PortMapping]:
    """The mappings of one `-p` spec, one per port.

    Raises:
        InvalidArgument: malformed spec, port out of range, unknown protocol, ranges of
            different sizes or longer than `MAX_RANGE`.
    """
    body, slash, proto = spec.strip().partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in PROTOCOLS:
        raise InvalidArgument(
            f"unknown protocol {proto!r} in {spec!r}: use tcp or udp", field="ports", spec=spec
        )
    parts = body.rsplit(":", 2) if "]" not in body else _split_bracketed(body)
    if len(parts) == 2:
        parts.insert(0, "")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise InvalidArgument(
            f"invalid port spec {spec!r}: expected [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]",
            field="ports",
            spec=spec,
        )
    host_ip = _host_ip(parts[0], spec)
    hosts, inner = _range(parts[1], spec), _range(parts[2], spec)
    if len(hosts) != len(inner):
        raise InvalidArgument(
            f"port ranges in {spec!r} differ in size ({len(hosts)} vs {len(inner)})", spec=spec
        )
    if len(hosts) > MAX_RANGE:
        raise InvalidArgument(f"port range in {spec!r} exceeds {MAX_RANGE} ports", spec=spec)
    return [
        PortMapping(protocol=proto, host_port=h, container_port=c, host_ip=host_ip)
        for h, c in zip(hosts, inner, strict=True)
    ]


def _split_bracketed(body: str) -> list[str]:
    """`[V6]:H:C` -> ["[V6]", "H", "C"] (anything else malformed: fewer parts)."""
    host, bracket, rest = body.partition("]:")
    return [host + "]", *rest.split(":", 1)] if bracket else [body]


def _show(host_ip: str) -> str:
    if not host_ip:
        return "0.0.0.0"
    return f"[{host_ip}]" if ":" in host_ip else host_ip


def parse_all(specs: Iterable[str]) -> list[PortMapping]:
    """Every spec parsed, refusing collisions among them; sorted."""
    found: list[PortMapping] = []
    for spec in specs:
        new = parse(spec)
        check_free(new, found)
        found += new
    return sorted(found)


def overlap(a: PortMapping, b: PortMapping) -> bool:
    """Would `a` and `b` claim the same incoming traffic?"""
    return (
        a.protocol == b.protocol
        and a.host_port == b.host_port
        and (a.host_ip == b.host_ip or not a.host_ip or not b.host_ip)
    )


def check_free(new: Iterable[PortMapping], taken: Iterable[PortMapping]) -> None:
    """Refuse `new` if any of them collides with a mapping in `taken`.

    Raises:
        Conflict: names the host address, port and protocol already published.
    """
    by_port: dict[tuple[str, int], list[PortMapping]] = {}
    for m in taken:
        by_port.setdefault((m.protocol, m.host_port), []).append(m)
    for m in new:
        for other in by_port.get((m.protocol, m.host_port), ()):
            if overlap(m, other):
                raise Conflict(
                    f"host port {describe(other)} is already published",
                    host_ip=other.host_ip or "0.0.0.0",
                    host_port=other.host_port,
                    protocol=other.protocol,
                )


def describe(m: PortMapping) -> str:
    """`0.0.0.0:8080/tcp`, the host side of a mapping."""
    return f"{_show(m.host_ip)}:{m.host_port}/{m.protocol}"


def format_spec(m: PortMapping) -> str:
    """`0.0.0.0:8080->80/tcp`, as `docker ps` shows it."""
    return f"{_show(m.host_ip)}:{m.host_port}->{m.container_port}/{m.protocol}"
