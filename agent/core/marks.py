"""Ownership marks: what a bridge's or a veth's alias (IFLA_IFALIAS) says about its network or
endpoint, so that the state can be rebuilt from the kernel when the store is lost.

Theory of operation. Every link agentd makes carries `netagent:net:<id>` (bridges) or
`netagent:ep:<id>` (host veth ends), which adoption reads to tell ours from foreign links.
After the id comes `:` and a payload: the record itself, packed (msgpack, addresses as bytes,
as an array without trailing defaults) and base64url-encoded. The kernel keeps at most 255
bytes of alias (IFALIASZ - 1); what must always fit does (a network's name, subnets, gateways,
flags and MTU: at most ~128 of the 132 bytes left after the id; an endpoint's network,
namespace path and key, names and addresses, when the path is of usual length), and what may
not (labels, the creation time; an engine's attachment key, published ports, DNS aliases)
goes in while there is room, in that order; a mark that lost something says so
(`incomplete`), and the rebuild reports it. Marks without a payload (written before marks had
one) still say who owns the link.

    netagent:net:<64 hex id>:<base64url(msgpack NetMark)>
    netagent:ep:<64 hex id>:<base64url(msgpack EpMark)>
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Sequence

import msgspec

from agent.core import naming
from agent.core.model import Endpoint, Network, PortMapping

ALIAS_MAX = 255  # IFALIASZ - 1
NETNS_DIR = "/run/netns/"
_NETNS_SHORT = "="  # a path under NETNS_DIR is kept as "=" + its name (no path starts with "=")

# NetMark.flags
INTERNAL, ICC, MASQUERADE, DEFAULT, IPV6, INCOMPLETE, NO_DNS = 1, 2, 4, 8, 16, 32, 64
# EpMark.flags
DEFAULT_ROUTE, SANDBOX, EP_INCOMPLETE = 1, 2, 4
_PROTOCOLS = ("tcp", "udp")


class NetMark(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """A network as its bridge's alias carries it (addresses packed)."""

    name: str
    subnet: bytes  # network address + prefix length
    gateway: bytes
    flags: int
    mtu: int = 1500
    subnet6: bytes | None = None
    gateway6: bytes | None = None
    ip_range: bytes | None = None
    created: int = 0
    labels: dict[str, str] = {}
    aux: dict[str, str] = {}


class EpMark(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """An endpoint as its host veth end's alias carries it."""

    network: bytes  # the first 6 bytes of the network id
    netns: str
    netns_key: str
    ifname: str
    ip: bytes
    mac: bytes
    flags: int = 0
    ip6: bytes | None = None
    ports: tuple[tuple[int, int, int, bytes], ...] = ()  # protocol, host, container, host ip
    attachment: str = ""
    aliases: tuple[str, ...] = ()  # its DNS names


_encoder = msgspec.msgpack.Encoder()
_net_decoder = msgspec.msgpack.Decoder(NetMark)
_ep_decoder = msgspec.msgpack.Decoder(EpMark)


def _cidr(text: str) -> bytes:
    net = ipaddress.ip_network(text)
    return net.network_address.packed + bytes([net.prefixlen])


def _uncidr(raw: bytes) -> str:
    return str(ipaddress.ip_network((ipaddress.ip_address(raw[:-1]), raw[-1])))


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _unaddr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _fit(prefix: str, candidates: Sequence[msgspec.Struct]) -> str:
    """`prefix` + the first candidate whose alias fits in ALIAS_MAX bytes."""
    for mark in candidates:
        alias = f"{prefix}:{base64.urlsafe_b64encode(_encoder.encode(mark)).decode()}"
        if len(alias) <= ALIAS_MAX:
            return alias
    return prefix  # unreachable for valid records: the last candidate always fits


def network_mark(net: Network) -> str:
    """The alias of `net`'s bridge."""
    flags = (
        INTERNAL * net.internal
        | ICC * net.icc
        | MASQUERADE * net.masquerade
        | DEFAULT * net.is_default
        | IPV6 * net.ipv6
        | NO_DNS * (not net.dns)
    )
    full = NetMark(
        name=net.name,
        subnet=_cidr(net.subnet),
        gateway=_addr(net.gateway),
        flags=flags,
        mtu=net.mtu,
        subnet6=_cidr(net.subnet6) if net.subnet6 else None,
        gateway6=_addr(net.gateway6) if net.gateway6 else None,
        ip_range=_cidr(net.ip_range) if net.ip_range else None,
        created=int(net.created),
        labels=dict(net.labels),
        aux=dict(net.aux_addresses),
    )
    lossy = flags | INCOMPLETE if (net.labels or net.aux_addresses) else flags
    smaller = msgspec.structs.replace(full, labels={}, aux={}, flags=lossy)
    smallest = msgspec.structs.replace(smaller, created=0, flags=flags | INCOMPLETE)
    return _fit(naming.bridge_alias(net.id), [full, smaller, smallest])


def _port(m: PortMapping) -> tuple[int, int, int, bytes]:
    host_ip = _addr(m.host_ip) if m.host_ip else b""
    return (_PROTOCOLS.index(m.protocol), m.host_port, m.container_port, host_ip)


def endpoint_mark(ep: Endpoint) -> str:
    """The alias of `ep`'s host veth end."""
    netns = ep.netns
    if netns.startswith(NETNS_DIR):
        netns = _NETNS_SHORT + netns[len(NETNS_DIR) :]
    flags = DEFAULT_ROUTE * ep.default_route | SANDBOX * (ep.sandbox is not None)
    full = EpMark(
        network=bytes.fromhex(ep.network_id[:12]),
        netns=netns,
        netns_key=ep.netns_key,
        ifname=ep.ifname,
        ip=_addr(ep.ip),
        mac=bytes.fromhex(ep.mac.replace(":", "")),
        flags=flags,
        ip6=_addr(ep.ip6) if ep.ip6 else None,
        ports=tuple(_port(m) for m in ep.ports),
        attachment=ep.attachment,
        aliases=ep.aliases,
    )
    lossy = flags | EP_INCOMPLETE
    candidates = [full]
    if ep.attachment:
        candidates.append(msgspec.structs.replace(full, attachment="", flags=lossy))
    base = candidates[-1]
    candidates += [
        msgspec.structs.replace(base, ports=base.ports[:n], flags=lossy)
        for n in range(len(base.ports) - 1, -1, -1)
    ]
    if ep.aliases:
        base = candidates[-1]
        candidates += [
            msgspec.structs.replace(base, aliases=base.aliases[:n], flags=lossy)
            for n in range(len(base.aliases) - 1, -1, -1)
        ]
    return _fit(naming.veth_alias(ep.id), candidates)


def has_payload(alias: str | None) -> bool:
    """Whether an alias of ours carries a record (cheap: no decoding)."""
    return alias is not None and alias.count(":") >= 3


def decode(alias: str | None) -> tuple[str, str, NetMark | EpMark | None] | None:
    """(kind, id, mark) of an alias of ours; the mark is None when the alias has no payload
    (or one that does not decode). None for an alias that is not ours."""
    owner = naming.parse_alias(alias)
    if owner is None:
        return None
    kind, ident = owner
    assert alias is not None
    _, _, payload = alias.partition(ident)
    if not payload.startswith(":"):
        return kind, ident, None
    try:
        raw = base64.urlsafe_b64decode(payload[1:])
        mark: NetMark | EpMark = (_net_decoder if kind == "net" else _ep_decoder).decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return kind, ident, None
    return kind, ident, mark


def network_of(ident: str, bridge: str, mark: NetMark) -> Network:
    """The `Network` that `mark` (on bridge `bridge`) describes."""
    return Network(
        id=ident,
        name=mark.name,
        bridge=bridge,
        subnet=_uncidr(mark.subnet),
        gateway=_unaddr(mark.gateway),
        ip_range=_uncidr(mark.ip_range) if mark.ip_range else None,
        internal=bool(mark.flags & INTERNAL),
        icc=bool(mark.flags & ICC),
        masquerade=bool(mark.flags & MASQUERADE),
        mtu=mark.mtu,
        labels=dict(mark.labels),
        aux_addresses=dict(mark.aux),
        is_default=bool(mark.flags & DEFAULT),
        ipv6=bool(mark.flags & IPV6),
        subnet6=_uncidr(mark.subnet6) if mark.subnet6 else None,
        gateway6=_unaddr(mark.gateway6) if mark.gateway6 else None,
        created=float(mark.created),
        dns=not mark.flags & NO_DNS,
    )


def endpoint_of(ident: str, network_id: str, host_ifname: str, mark: EpMark) -> Endpoint:
    """The `Endpoint` that `mark` (on veth `host_ifname`, in network `network_id`) describes."""
    netns = mark.netns
    if netns.startswith(_NETNS_SHORT):
        netns = NETNS_DIR + netns[len(_NETNS_SHORT) :]
    ports = tuple(
        sorted(
            PortMapping(
                protocol=_PROTOCOLS[proto],
                host_port=host,
                container_port=container,
                host_ip=_unaddr(host_ip) if host_ip else "",
            )
            for proto, host, container, host_ip in mark.ports
        )
    )
    sandbox = None
    if mark.flags & SANDBOX and netns.startswith(NETNS_DIR):
        sandbox = netns[len(NETNS_DIR) :]
    return Endpoint(
        id=ident,
        network_id=network_id,
        netns=netns,
        netns_key=mark.netns_key,
        ifname=mark.ifname,
        host_ifname=host_ifname,
        ip=_unaddr(mark.ip),
        mac=":".join(f"{b:02x}" for b in mark.mac),
        sandbox=sandbox,
        default_route=bool(mark.flags & DEFAULT_ROUTE),
        ports=ports,
        ip6=_unaddr(mark.ip6) if mark.ip6 else None,
        attachment=mark.attachment,
        aliases=mark.aliases,
    )
