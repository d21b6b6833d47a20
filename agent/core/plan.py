"""Decisions of the service, made in the core: what a network or an endpoint will be (pure).

Theory of operation. Every front end (JSON-RPC, the CNI plugin, Docker's plugin protocol)
converts its request into a `NetworkSpec` or an `EndpointSpec` at its edge; the service gathers
what only the shells know (host routes, the namespace's identity, fresh randomness) and asks
this module for the decision:

- `plan_network` validates a spec against the topology and returns the `Network` to make (and
  a newly drawn ULA /48 if it needed one); nothing in the topology changes.
- `reserve_endpoint` validates an endpoint, takes its addresses and puts it in the topology,
  with no await in between (concurrent requests then see its addresses, name and default
  route). `join_endpoint` gives a reserved endpoint its namespace (Docker's Join).
- `check_ports` decides whether mappings may be published on a network.

The service then applies the decision to kernel, firewall and store, and undoes the
reservation if that fails (`Topology.remove_endpoint`, `Topology.release_addresses`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from agent.core import blocks, ipam, ipam6, names, naming, ports
from agent.core import options as option_table
from agent.core.bitmap import RangeAllocator
from agent.core.errors import AgentError, Conflict, InvalidArgument, PoolExhausted
from agent.core.model import Endpoint, Network, PortMapping
from agent.core.pools import IPNetwork, Pool
from agent.core.topology import Topology

#: A Linux bridge holds at most 1023 ports (BR_MAX_PORTS = 1024, port 0 reserved): the
#: 1024th endpoint is refused before the kernel would answer "Exchange full".
MAX_BRIDGE_PORTS = 1023
_HEX_ID = re.compile(r"[0-9a-f]{64}")


class NetworkSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A network as a client asks for it (any front end); `plan_network` decides the rest."""

    name: str
    id: str | None = None  # given by an engine (Docker's NetworkID), else drawn
    subnet: str | None = None
    gateway: str | None = None
    ip_range: str | None = None
    ipv6: bool = False
    subnet6: str | None = None
    gateway6: str | None = None
    internal: bool = False
    icc: bool = True
    masquerade: bool = True
    mtu: int = 1500
    bridge: str | None = None  # an existing or custom bridge device name
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    aux_addresses: dict[str, str] = msgspec.field(default_factory=dict)
    is_default: bool = False
    dns: bool = True  # off for the default network whatever this says (names.dns_enabled)


def network_spec(name: str, options: Mapping[str, str] | None = None, **fields: Any) -> NetworkSpec:
    """A `NetworkSpec` from typed `fields` and the option table's `options` (string values,
    short or Docker names). An option may set a field left at its default; one contradicting
    a field given otherwise is refused.

    Raises:
        InvalidArgument: an unknown or malformed option, or two values for one field.
    """
    defaults = NetworkSpec(name=name)
    for key, value in option_table.parse(options or {}).items():
        given = fields.get(key, getattr(defaults, key))
        if given != getattr(defaults, key) and given != value:
            raise InvalidArgument(
                f"option {key}={value} contradicts {key}={given} given otherwise", field=key
            )
        fields[key] = value
    return NetworkSpec(name=name, **fields)


class NetworkPlan(msgspec.Struct, frozen=True):
    """What `plan_network` decided: the network, and the host's ULA /48 if it drew one."""

    network: Network
    ula48: ipaddress.IPv6Network | None = None


def plan_network(
    spec: NetworkSpec,
    *,
    topo: Topology,
    pools: Sequence[Pool],
    routes: Iterable[IPNetwork] | None = None,
    new_id: str,
    random40: int,
    now: float,
) -> NetworkPlan:
    """Validate `spec` against the topology and decide the network (nothing is changed).

    Args:
        spec: what was asked.
        topo: the current topology (names, bridges, subnets, the last subnet chosen).
        pools: where subnets come from.
        routes: the host's routes; a chosen subnet avoids them. None: the topology's own
            record of them (`Topology.routes4`, which the service keeps up to date).
        new_id: the id to use when the spec gives none (64 hex characters).
        random40: 40 random bits, used when a ULA /48 must be drawn for IPv6.
        now: creation time (unix).

    Raises:
        InvalidArgument, Conflict, PoolExhausted: the spec cannot be honoured.
    """
    naming.validate_network_name(spec.name)
    if topo.has_network_named(spec.name):
        raise Conflict(f"network with name {spec.name!r} already exists", name=spec.name)
    net_id = new_id if spec.id is None else spec.id
    if not _HEX_ID.fullmatch(net_id):
        raise InvalidArgument(f"invalid network id {net_id!r}: 64 hex characters", field="id")
    if net_id in topo.networks:
        raise Conflict(f"network id {net_id[:12]} already exists", network=net_id)
    if not 68 <= spec.mtu <= 65535:
        raise InvalidArgument(f"invalid MTU {spec.mtu}: must be between 68 and 65535", field="mtu")
    if any(not key for key in spec.labels):
        raise InvalidArgument("label keys must not be empty", field="labels")
    bridge = naming.DEFAULT_BRIDGE if spec.is_default else naming.bridge_name(net_id)
    if spec.bridge is not None:
        bridge = naming.validate_ifname(spec.bridge, "bridge")
    if topo.network_of_bridge(bridge) is not None:
        raise Conflict(f"bridge {bridge!r} is already used by another network", bridge=bridge)
    if routes is None:
        taken = topo.taken4()
    else:  # routes given as such (tests, one-off callers): an index of them built now
        found = blocks.BlockSet(blocks.span(r) for r in routes if r.prefixlen > 0)
        taken = blocks.Either(topo.used4, found)
    subnet, gateway, ip_range = ipam.plan_subnet(
        subnet=spec.subnet,
        gateway=spec.gateway,
        ip_range=spec.ip_range,
        pools=pools,
        used=topo.subnets() if spec.subnet is not None else (),  # `taken` stands for it
        avoid=(),
        after=topo.last_subnet,
        taken=taken,
        used_index=topo.used4,
    )
    _check_aux(spec.aux_addresses, subnet, gateway, ip_range, topo.range_allocator)
    v6, ula48 = _plan_v6(topo, spec, random40)
    network = Network(
        id=net_id,
        name=spec.name,
        bridge=bridge,
        subnet=str(subnet),
        gateway=str(gateway),
        ip_range=str(ip_range) if ip_range else None,
        internal=spec.internal,
        icc=spec.icc,
        masquerade=spec.masquerade,
        mtu=spec.mtu,
        labels=dict(spec.labels),
        aux_addresses=dict(spec.aux_addresses),
        is_default=spec.is_default,
        ipv6=spec.ipv6,
        subnet6=str(v6[0]) if v6 else None,
        gateway6=str(v6[1]) if v6 else None,
        created=now,
        dns=spec.dns and not spec.is_default,
    )
    return NetworkPlan(network, ula48)


def _check_aux(
    aux: dict[str, str],
    subnet: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
    ip_range: ipaddress.IPv4Network | None,
    range_allocator: Callable[..., RangeAllocator],
) -> None:
    """Refuse --aux-address values that are not free addresses of the subnet."""
    if not aux:
        return
    trial = ipam.AddressAllocator(subnet, gateway, ip_range, range_allocator=range_allocator)
    for name, text in aux.items():
        try:
            trial.reserve(parse_ip(text))
        except AgentError as exc:
            message = f"--aux-address {name}={text}: {exc.message}"
            raise type(exc)(message, field="aux_addresses") from exc


def _plan_v6(
    topo: Topology, spec: NetworkSpec, random40: int
) -> tuple[
    tuple[ipaddress.IPv6Network, ipaddress.IPv6Address] | None, ipaddress.IPv6Network | None
]:
    """((IPv6 subnet, gateway) or None when IPv4 only, a newly drawn ULA /48 or None).

    Without a given IPv6 subnet, a /64 of the host's ULA /48, drawn from `random40` if the
    host has none yet (the service keeps it, with the network).
    """
    if not spec.ipv6:
        if spec.subnet6 is not None or spec.gateway6 is not None:
            raise InvalidArgument(
                "an IPv6 subnet or gateway needs --ipv6", subnet6=spec.subnet6, field="ipv6"
            )
        return None, None
    used = [alloc.subnet for alloc in topo.allocators6.values()]
    base, drawn = topo.ula48, None
    if base is None and spec.subnet6 is None:
        base = drawn = ipam6.ula48(random40)
    v6 = ipam6.plan_subnet6(
        subnet=spec.subnet6,
        gateway=spec.gateway6,
        base=base or ipaddress.IPv6Network("fd00::/48"),
        used=used,
    )
    return v6, drawn


class EndpointSpec(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as a client asks for it; the namespace is resolved by the service."""

    network: str  # name, id or unique id prefix
    netns: str | None = None  # as the client named it; None: reserve only (no namespace yet)
    ip: str | None = None
    ip6: str | None = None
    mac: str | None = None
    ports: tuple[PortMapping, ...] = ()
    ifname: str | None = None  # name inside the namespace (default: the next free ethN)
    attachment: str = ""  # an engine's key for the endpoint (CNI: CONTAINERID/IFNAME)
    name: str | None = None  # its DNS name (`run`: the namespace's name unless given)
    aliases: tuple[str, ...] = ()  # more DNS names (Docker's --network-alias)


def check_ports(
    net: Network,
    wanted: Sequence[PortMapping],
    taken: Iterable[PortMapping],
    current: Sequence[PortMapping] = (),
) -> tuple[PortMapping, ...]:
    """`current` plus `wanted`, sorted, if `net` may publish them and no other mapping holds
    their host ports.

    Raises:
        InvalidArgument: the network is internal, or an IPv6 host address on an IPv4 network.
        Conflict: a host port is already published (`ports.check_free`).
    """
    if not wanted:
        return tuple(current)
    if net.internal:
        raise InvalidArgument(
            f"network {net.name!r} is internal: its endpoints cannot publish ports",
            network=net.name,
        )
    v6 = next((m for m in wanted if ":" in m.host_ip), None)
    if v6 is not None and not net.ipv6:
        raise InvalidArgument(
            f"port {ports.format_spec(v6)}: network {net.name!r} is not IPv6-enabled",
            network=net.name,
        )
    ports.check_free(wanted, taken)
    return tuple(sorted((*current, *wanted)))


def reserve_endpoint(
    topo: Topology,
    net: Network,
    spec: EndpointSpec,
    *,
    new_id: str,
    netns: str = "",
    netns_key: str = "",
    sandbox: str | None = None,
) -> Endpoint:
    """Validate the endpoint, take its addresses and put it in the topology (joined to the
    namespace `netns`/`netns_key` when given, else only reserved).

    Raises:
        Conflict: the namespace is on `net` already, an address, interface name, attachment
            key or host port is taken. PoolExhausted: no address left, or the bridge is full.
        InvalidArgument: a malformed or impossible value.
    """
    if spec.attachment and topo.endpoint_of_attachment(spec.attachment) is not None:
        raise Conflict(
            f"attachment {spec.attachment!r} already has an endpoint", attachment=spec.attachment
        )
    ifname, default_route = "", False
    if netns_key:
        ifname, default_route = _place(topo, net, spec.ifname, netns, netns_key)
    elif spec.ifname is not None:
        ifname = naming.validate_ifname(spec.ifname)
    if topo.count_of(net.id) >= MAX_BRIDGE_PORTS:
        raise PoolExhausted(
            f"network {net.name!r} has {MAX_BRIDGE_PORTS} endpoints, the most a Linux bridge "
            "can hold",
            network=net.name,
        )
    requested = parse_ip(spec.ip) if spec.ip is not None else None
    aliases = names.endpoint_names(spec.name, spec.aliases)
    mac = ipam.validate_mac(spec.mac) if spec.mac is not None else None
    published = check_ports(net, spec.ports, (m for e in topo.with_ports() for m in e.ports))
    alloc, alloc6 = topo.allocators[net.id], topo.allocators6.get(net.id)
    if alloc6 is None and spec.ip6 is not None:
        raise InvalidArgument(
            f"network {net.name!r} is not IPv6-enabled: --ip6 cannot be used", field="ip6"
        )
    ip = alloc.allocate(requested)
    try:
        ip6 = None
        if alloc6 is not None:
            wanted6 = None if spec.ip6 is None else ipam6.parse_address6(spec.ip6, "IPv6 address")
            ip6 = alloc6.allocate(wanted6)
    except BaseException:
        alloc.release(ip)
        raise
    ep = Endpoint(
        id=new_id,
        network_id=net.id,
        netns=netns,
        netns_key=netns_key,
        ifname=ifname,
        host_ifname=naming.host_veth_name(new_id),
        ip=str(ip),
        mac=mac or ipam.mac_for(ipaddress.IPv4Address(ip)),
        sandbox=sandbox,
        default_route=default_route,
        ports=published,
        ip6=str(ip6) if ip6 is not None else None,
        attachment=spec.attachment,
        aliases=aliases,
    )
    topo.add_endpoint(ep)
    return ep


def join_endpoint(
    topo: Topology, ep: Endpoint, *, netns: str, netns_key: str, ifname: str | None = None
) -> Endpoint:
    """A reserved endpoint given its namespace (the topology is updated).

    Raises:
        Conflict: it has joined already, or the namespace is on its network already, or the
            interface name is taken there.
    """
    if ep.joined:
        raise Conflict(f"endpoint {ep.id[:12]} is attached already", endpoint=ep.id)
    net = topo.networks[ep.network_id]
    name, default_route = _place(topo, net, ifname or ep.ifname or None, netns, netns_key)
    joined = msgspec.structs.replace(
        ep, netns=netns, netns_key=netns_key, ifname=name, default_route=default_route
    )
    topo.add_endpoint(joined)
    return joined


def _place(
    topo: Topology, net: Network, ifname: str | None, netns: str, netns_key: str
) -> tuple[str, bool]:
    """(interface name, holds the default route) of a new endpoint of `net` in a namespace."""
    present = topo.endpoints_in(netns_key)
    if any(e.network_id == net.id for e in present):
        raise Conflict(
            f"namespace {netns!r} is already connected to network {net.name!r}",
            network=net.name,
            netns=netns,
        )
    taken = {e.ifname for e in present}
    if ifname is None:
        ifname = next(
            n for i in range(len(taken) + 1) if (n := naming.container_ifname(i)) not in taken
        )
    elif naming.validate_ifname(ifname) in taken:
        raise Conflict(f"interface {ifname} is taken in {netns}", ifname=ifname, netns=netns)
    # one default route per namespace: the first non-internal network's (like Docker)
    return ifname, not net.internal and not any(e.default_route for e in present)


def parse_ip(text: str) -> ipaddress.IPv4Address:
    """An IPv4 address, or InvalidArgument."""
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid IPv4 address {text!r}", field="ip") from exc


def labels_match(net: Network, filters: Iterable[str]) -> bool:
    """Whether `net` has every label filter: `KEY` (present) or `KEY=VALUE`."""
    for f in filters:
        key, eq, value = f.partition("=")
        if key not in net.labels or (eq and net.labels[key] != value):
            return False
    return True
