"""What the kernel shell is asked to build: a bridge, an attachment (pure values).

Theory of operation. The service decides every value the kernel sees (names, addresses,
routes, MTU) from the topology; the kernel shell only carries them out. These frozen values are
that hand-over: built from a `Network` (and an `Endpoint`) by `bridge_of` and `attachment_of`,
they validate themselves on construction (h11's style: a value that exists is well formed), so
the kernel worker gets nothing it would have to second-guess, and a bad value fails in the
caller, before any kernel work, with `InvalidArgument` naming the field.
"""

from __future__ import annotations

import ipaddress

import msgspec

from agent.core import marks, naming
from agent.core.errors import InvalidArgument
from agent.core.ipam import validate_mac
from agent.core.model import Endpoint, Network

_set = msgspec.structs.force_setattr  # canonical forms, set during validation only


def gateway_cidr(net: Network, family: int = 4) -> str | None:
    """The gateway as the bridge carries it (`172.18.0.1/16`); None for IPv6 on a network that
    is not dual stack."""
    if family == 4:
        return f"{net.gateway}/{ipaddress.IPv4Network(net.subnet).prefixlen}"
    if not (net.ipv6 and net.subnet6 and net.gateway6):
        return None
    return f"{net.gateway6}/{ipaddress.IPv6Network(net.subnet6).prefixlen}"


def _cidr(value: str | None, version: int, field: str) -> str | None:
    if value is None:
        return None
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        iface = None
    if iface is None or iface.version != version or "/" not in value:
        raise InvalidArgument(f"invalid IPv{version} address/prefix {value!r}", field=field)
    return str(iface)


def _address(value: str | None, version: int, field: str) -> str | None:
    if value is None:
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        addr = None
    if addr is None or addr.version != version:
        raise InvalidArgument(f"invalid IPv{version} gateway {value!r}", field=field)
    return str(addr)


def _mtu(mtu: int) -> int:
    if not 68 <= mtu <= 65535:
        raise InvalidArgument(f"invalid MTU {mtu}: must be between 68 and 65535", field="mtu")
    return mtu


class Bridge(msgspec.Struct, frozen=True):
    """A bridge as the kernel shell makes, adopts, repairs or deletes it.

    `address`/`address6` are the gateway CIDRs the agent adds (and, for a user's bridge, the
    only things it removes); `alias` is the ownership mark (`marks.network_mark`). A bridge
    known by name only (a leftover to delete) has neither.
    """

    name: str
    alias: str = ""
    address: str | None = None
    address6: str | None = None
    mtu: int = 1500

    def __post_init__(self) -> None:
        naming.validate_ifname(self.name, "bridge")
        _set(self, "address", _cidr(self.address, 4, "address"))
        _set(self, "address6", _cidr(self.address6, 6, "address6"))
        _mtu(self.mtu)


class Attachment(msgspec.Struct, frozen=True):
    """A namespace joined to a bridge by a veth pair: everything `attach` needs.

    `address`/`address6` are CIDRs; `gateway`/`gateway6` are set when this endpoint holds the
    namespace's default route.
    """

    netns: str  # path of the namespace file
    bridge: str
    host_ifname: str  # host end, a port of `bridge`
    alias: str  # ownership mark of the host end (`marks.endpoint_mark`)
    ifname: str  # name inside the namespace
    mac: str
    mtu: int
    address: str
    gateway: str | None = None
    address6: str | None = None
    gateway6: str | None = None

    def __post_init__(self) -> None:
        naming.validate_ifname(self.bridge, "bridge")
        naming.validate_ifname(self.host_ifname, "host_ifname")
        naming.validate_ifname(self.ifname, "ifname")
        if not self.netns.startswith("/"):
            raise InvalidArgument(f"namespace path {self.netns!r} is not absolute", field="netns")
        _set(self, "mac", validate_mac(self.mac))
        _mtu(self.mtu)
        _set(self, "address", _cidr(self.address, 4, "address"))
        _set(self, "gateway", _address(self.gateway, 4, "gateway"))
        _set(self, "address6", _cidr(self.address6, 6, "address6"))
        _set(self, "gateway6", _address(self.gateway6, 6, "gateway6"))


def bridge_of(net: Network) -> Bridge:
    """The bridge of `net`, with its gateways and ownership alias."""
    return Bridge(
        name=net.bridge,
        alias=marks.network_mark(net),
        address=gateway_cidr(net, 4),
        address6=gateway_cidr(net, 6),
        mtu=net.mtu,
    )


def attachment_of(net: Network, ep: Endpoint) -> Attachment:
    """How `ep` joins `net` (connect, and re-attach after a restart)."""
    dual = ep.ip6 is not None and net.subnet6 is not None
    return Attachment(
        netns=ep.netns,
        bridge=net.bridge,
        host_ifname=ep.host_ifname,
        alias=marks.endpoint_mark(ep),
        ifname=ep.ifname,
        mac=ep.mac,
        mtu=net.mtu,
        address=f"{ep.ip}/{ipaddress.IPv4Network(net.subnet).prefixlen}",
        gateway=net.gateway if ep.default_route else None,
        address6=f"{ep.ip6}/{ipaddress.IPv6Network(net.subnet6 or '').prefixlen}" if dual else None,
        gateway6=net.gateway6 if dual and ep.default_route else None,
    )
