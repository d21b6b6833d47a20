"""Docker's plugin requests as core values, and core values as Docker's answers (pure).

What dockerd 20.10 sends (observed) and how it maps:
- CreateNetwork never carries the network's name: the agent network's `id` is Docker's
  NetworkID and its name the first 12 characters of it (`network_name`). The pool and the
  gateway arrive in CIDR form (`172.18.0.0/16`, `172.18.0.1/16`) and are used as given,
  whichever IPAM driver chose them; `AuxAddresses` values are CIDRs too.
- `docker network create -o K=V` arrives in `Options["com.docker.network.generic"]` and goes
  through the one option table (`agent.core.options`: Docker's own names are aliases);
  `--internal` and `--ipv6` arrive as their own option keys.
- CreateEndpoint's `Interface` holds the address (CIDR) and maybe a MAC; the answer gives only
  what Docker left empty (the MAC), never a different address.
- `com.docker.network.portmap` (ProgramExternalConnectivity) is a list of libnetwork
  `PortBinding`s: protocol numbers, host IP "" / "0.0.0.0" / "::" for every address. A host
  port range (`-p 8000-8010:80`: any free port of it) publishes its first port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import msgspec

from agent.core import plan
from agent.core.errors import InvalidArgument
from agent.core.model import PortMapping
from agent.frontends.docker import wire

GENERIC = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
INTERNAL = "com.docker.network.internal"
PORTMAP = "com.docker.network.portmap"
GATEWAY_REQUEST = "com.docker.network.gateway"  # RequestAddress Options["RequestAddressType"]
_PROTOCOLS = {6: "tcp", 17: "udp"}
_ANY_HOST = {"", "0.0.0.0", "::"}


def network_name(network_id: str) -> str:
    """The agent network's name for a Docker network: its id's first 12 characters."""
    return network_id[:12]


def split_cidr(text: str, field: str) -> tuple[str, int]:
    """("172.18.0.1", 16) of "172.18.0.1/16"; a bare address gets its family's full length."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid {field} {text!r}", field=field) from exc
    return str(iface.ip), iface.network.prefixlen


def _flag(options: Mapping[str, Any], key: str) -> bool:
    value = options.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _one_pool(data: list[wire.IPAMData] | None, family: str) -> wire.IPAMData | None:
    if not data:
        return None
    if len(data) > 1:
        raise InvalidArgument(f"one {family} pool per network, got {len(data)}", field="subnet")
    return data[0]


def network_spec(req: wire.CreateNetwork) -> plan.NetworkSpec:
    """The agent network for Docker's CreateNetwork.

    Raises:
        InvalidArgument: a malformed pool, gateway or option, an unknown option, two pools of
            one family, or an IPv6 network without an IPv6 pool.
    """
    options = req.Options or {}
    generic = options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise InvalidArgument(f"{GENERIC} must be an object", field="options")
    fields: dict[str, Any] = {"id": req.NetworkID}
    if _flag(options, INTERNAL):
        fields["internal"] = True
    v4 = _one_pool(req.IPv4Data, "IPv4")
    if v4 is not None and v4.Pool:
        fields["subnet"] = v4.Pool
        if v4.Gateway:
            fields["gateway"] = split_cidr(v4.Gateway, "gateway")[0]
        if v4.AuxAddresses:
            fields["aux_addresses"] = {
                name: split_cidr(cidr, "aux address")[0] for name, cidr in v4.AuxAddresses.items()
            }
    if _flag(options, ENABLE_IPV6):
        v6 = _one_pool(req.IPv6Data, "IPv6")
        if v6 is None or not v6.Pool:
            raise InvalidArgument("an IPv6 network needs an IPv6 pool (--subnet)", field="ipv6")
        fields["ipv6"] = True
        fields["subnet6"] = v6.Pool
        if v6.Gateway:
            fields["gateway6"] = split_cidr(v6.Gateway, "IPv6 gateway")[0]
    strings = {str(k): str(v) for k, v in generic.items()}
    return plan.network_spec(network_name(req.NetworkID), strings, **fields)


def endpoint_spec(req: wire.CreateEndpoint) -> plan.EndpointSpec:
    """The reservation for Docker's CreateEndpoint (its EndpointID is the attachment key)."""
    iface = req.Interface or wire.EndpointInterface()
    return plan.EndpointSpec(
        network=req.NetworkID,
        ip=split_cidr(iface.Address, "address")[0] if iface.Address else None,
        ip6=split_cidr(iface.AddressIPv6, "IPv6 address")[0] if iface.AddressIPv6 else None,
        mac=iface.MacAddress or None,
        attachment=req.EndpointID,
    )


def created_interface(req: wire.CreateEndpoint, mac: str) -> dict[str, Any]:
    """CreateEndpoint's answer: only the fields Docker left empty (the MAC)."""
    given = req.Interface or wire.EndpointInterface()
    return {} if given.MacAddress else {"Interface": {"MacAddress": mac}}


def port_mappings(options: Mapping[str, Any] | None) -> list[PortMapping]:
    """The published ports of `com.docker.network.portmap` (none if absent).

    Raises:
        InvalidArgument: a malformed entry, a protocol other than TCP/UDP, or no host port
            (`-p PORT` lets the driver pick one: not supported, give `-p HOST:PORT`).
    """
    raw = (options or {}).get(PORTMAP) or []
    try:
        bindings = msgspec.convert(raw, list[wire.PortBinding])
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"invalid {PORTMAP}: {exc}", field="ports") from exc
    found: dict[PortMapping, None] = {}  # ordered, no duplicates (0.0.0.0 and :: are one)
    for b in bindings:
        proto = _PROTOCOLS.get(b.Proto)
        if proto is None:
            raise InvalidArgument(f"protocol {b.Proto} cannot be published (tcp, udp)")
        if not b.HostPort:
            raise InvalidArgument(
                f"port {b.Port}/{proto} has no host port: give one (-p HOST:{b.Port})",
                field="ports",
            )
        host_ip = "" if b.HostIP in _ANY_HOST else b.HostIP
        mapping = PortMapping(
            protocol=proto, host_port=b.HostPort, container_port=b.Port, host_ip=host_ip
        )
        found[mapping] = None
    return list(found)


def pool_address(pool: str, address: str, *, gateway: bool) -> str:
    """The CIDR answer of RequestAddress: `address` (or, for the gateway, the pool's first
    host) with the pool's prefix length.

    Raises:
        InvalidArgument: the pool or the address is malformed, or the address is outside it.
    """
    try:
        net = ipaddress.ip_network(pool)
    except ValueError as exc:
        raise InvalidArgument(f"invalid pool {pool!r}", field="pool") from exc
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if address:
        ip = ipaddress.ip_address(split_cidr(address, "address")[0])
        if ip not in net:
            raise InvalidArgument(f"address {ip} is not in pool {net}", field="address")
    elif gateway:
        ip = net.network_address + (1 if net.num_addresses > 2 else 0)
    else:
        raise InvalidArgument("no address given", field="address")
    return f"{ip}/{net.prefixlen}"
