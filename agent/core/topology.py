"""The in-memory topology: networks, endpoints, sandboxes, one address allocator per network.

Pure (no I/O). Every lookup the request path needs is a dict access: endpoints are indexed by
network, by namespace (joined ones), by host veth name and by an engine's attachment key,
networks by name and by bridge, so that a request costs the same with 10,000 endpoints as with
one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

from agent.core import blocks, ipam, ipam6
from agent.core.bitmap import RangeAllocator
from agent.core.errors import InvalidArgument, NotFound
from agent.core.model import Endpoint, Network, Sandbox
from agent.core.pools import IPAddress


class Topology:
    """What the agent owns, as it is now (the store holds the same, durably)."""

    def __init__(self, range_allocator: Callable[..., RangeAllocator]) -> None:
        """`range_allocator` builds each network's offset allocator (`agent.accel` picks it)."""
        self.range_allocator = range_allocator
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.sandboxes: dict[str, Sandbox] = {}
        self.allocators: dict[str, ipam.AddressAllocator] = {}
        self.last_subnet: ipaddress.IPv4Network | None = None
        self.allocators6: dict[str, ipam6.AddressAllocator6] = {}  # dual-stack networks
        self.ula48: ipaddress.IPv6Network | None = None  # the host's ULA /48 (store meta)
        self._by_name: dict[str, str] = {}
        self._by_bridge: dict[str, str] = {}
        self._by_gateway: dict[str, str] = {}  # gateway address (either family) -> network id
        self._of_network: dict[str, dict[str, Endpoint]] = {}
        self._in_netns: dict[str, dict[str, Endpoint]] = {}
        self._by_veth: dict[str, str] = {}
        self._by_attachment: dict[str, str] = {}
        self._with_ports: dict[str, Endpoint] = {}
        self.used4 = blocks.BlockSet()  # the networks' IPv4 subnets, kept as they come and go
        #: the host's IPv4 routes as last seen (the service keeps it, `Networks.routes`)
        self.routes4 = blocks.BlockSet()

    # -- networks ---------------------------------------------------------------------------

    def add_network(self, net: Network) -> None:
        self.networks[net.id] = net
        self._by_name[net.name] = net.id
        self._by_bridge[net.bridge] = net.id
        for gateway in (net.gateway, net.gateway6):
            if gateway:
                self._by_gateway[gateway] = net.id
        self._of_network.setdefault(net.id, {})
        alloc = ipam.AddressAllocator(
            ipaddress.IPv4Network(net.subnet),
            ipaddress.IPv4Address(net.gateway),
            ipaddress.IPv4Network(net.ip_range) if net.ip_range else None,
            range_allocator=self.range_allocator,
        )
        for aux in net.aux_addresses.values():
            alloc.reserve(ipaddress.IPv4Address(aux))
        self.allocators[net.id] = alloc
        self.used4.add(*blocks.span(alloc.subnet))
        if net.ipv6 and net.subnet6 and net.gateway6:
            self.allocators6[net.id] = ipam6.AddressAllocator6(
                ipaddress.IPv6Network(net.subnet6), ipaddress.IPv6Address(net.gateway6)
            )

    def subnets(self) -> list[ipaddress.IPv4Network]:
        """The IPv4 subnets of every network: the allocators' own objects, whose derived
        addresses `ipaddress` caches, so subnet choice costs no parsing per network."""
        return [alloc.subnet for alloc in self.allocators.values()]

    def taken4(self) -> blocks.Either:
        """The IPv4 space a chosen subnet must avoid: the networks' subnets and the host's
        routes (`routes4`), both kept incrementally."""
        return blocks.Either(self.used4, self.routes4)

    def remove_network(self, network_id: str) -> None:
        """Forget a network (its endpoints must be gone already)."""
        net = self.networks.pop(network_id)
        del self._by_name[net.name]
        del self._by_bridge[net.bridge]
        for gateway in (net.gateway, net.gateway6):
            if gateway and self._by_gateway.get(gateway) == network_id:
                del self._by_gateway[gateway]
        self.used4.remove(*blocks.span(self.allocators.pop(network_id).subnet))
        self.allocators6.pop(network_id, None)
        assert not self._of_network.pop(network_id), "network removed with endpoints"

    def find_network(self, ref: str) -> Network:
        """By name, full id, or unique id prefix (like Docker)."""
        net_id = self._by_name.get(ref) or (ref if ref in self.networks else None)
        if net_id is not None:
            return self.networks[net_id]
        matches = [n for n in self.networks.values() if ref and n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(f"network id prefix {ref!r} is ambiguous", network=ref)
        raise NotFound(f"network {ref!r} not found", network=ref)

    def has_network_named(self, name: str) -> bool:
        return name in self._by_name

    def network_of_bridge(self, bridge: str) -> Network | None:
        net_id = self._by_bridge.get(bridge)
        return None if net_id is None else self.networks[net_id]

    def network_of_gateway(self, address: str) -> Network | None:
        """The network whose IPv4 or IPv6 gateway is `address` (as the network spells it)."""
        net = self.networks.get(self._by_gateway.get(address, ""))
        return net if net is not None and address in (net.gateway, net.gateway6) else None

    # -- endpoints --------------------------------------------------------------------------

    def add_endpoint(self, ep: Endpoint) -> None:
        """Add `ep`, or replace the endpoint with the same id (its ports changed, it joined)."""
        old = self.endpoints.get(ep.id)
        if old is not None and old.netns_key != ep.netns_key:
            self._unindex_netns(old)
        self.endpoints[ep.id] = ep
        self._of_network[ep.network_id][ep.id] = ep
        if ep.netns_key:
            self._in_netns.setdefault(ep.netns_key, {})[ep.id] = ep
        self._by_veth[ep.host_ifname] = ep.id
        if ep.attachment:
            self._by_attachment[ep.attachment] = ep.id
        if ep.ports:
            self._with_ports[ep.id] = ep
        else:
            self._with_ports.pop(ep.id, None)

    def _unindex_netns(self, ep: Endpoint) -> None:
        in_ns = self._in_netns.get(ep.netns_key)
        if in_ns is not None:
            in_ns.pop(ep.id, None)
            if not in_ns:
                del self._in_netns[ep.netns_key]

    def remove_endpoint(self, endpoint_id: str) -> Endpoint:
        ep = self.endpoints.pop(endpoint_id)
        del self._of_network[ep.network_id][ep.id]
        self._unindex_netns(ep)
        del self._by_veth[ep.host_ifname]
        if ep.attachment:
            self._by_attachment.pop(ep.attachment, None)
        self._with_ports.pop(ep.id, None)
        return ep

    def find_endpoint(self, ref: str) -> Endpoint:
        """By attachment key, full id, or unique id prefix (of at least 12 characters)."""
        ep_id = self._by_attachment.get(ref) or (ref if ref in self.endpoints else None)
        if ep_id is not None:
            return self.endpoints[ep_id]
        if len(ref) >= 12:
            matches = [e for e in self.endpoints.values() if e.id.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(f"endpoint id prefix {ref!r} is ambiguous", endpoint=ref)
        raise NotFound(f"endpoint {ref!r} not found", endpoint=ref)

    def endpoint_of_attachment(self, key: str) -> Endpoint | None:
        ep_id = self._by_attachment.get(key)
        return None if ep_id is None else self.endpoints[ep_id]

    def addresses(
        self, network_id: str, ip: str | None, ip6: str | None = None
    ) -> Iterator[tuple[ipam.Allocator, IPAddress]]:
        """(allocator, address) of each of an endpoint's addresses whose network (and family)
        still has an allocator: both families alike."""
        for table, text in ((self.allocators, ip), (self.allocators6, ip6)):
            alloc: ipam.Allocator | None = table.get(network_id)
            if text and alloc is not None:
                yield alloc, ipaddress.ip_address(text)

    def reserve_addresses(self, ep: Endpoint) -> None:
        """Take an endpoint's addresses again (adoption after a restart)."""
        for alloc, addr in self.addresses(ep.network_id, ep.ip, ep.ip6):
            alloc.reserve(addr)

    def release_addresses(self, network_id: str, ip: str | None, ip6: str | None = None) -> None:
        """Give an endpoint's addresses back, if its network still exists (a forced rm may
        have gone first) and they are still taken."""
        for alloc, addr in self.addresses(network_id, ip, ip6):
            if alloc.is_allocated(addr):
                alloc.release(addr)

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return list(self._of_network.get(network_id, {}).values())

    def count_of(self, network_id: str) -> int:
        return len(self._of_network.get(network_id, ()))

    def endpoints_in(self, netns_key: str) -> list[Endpoint]:
        return list(self._in_netns.get(netns_key, {}).values())

    def endpoint_of_veth(self, host_ifname: str) -> Endpoint | None:
        ep_id = self._by_veth.get(host_ifname)
        return None if ep_id is None else self.endpoints[ep_id]

    def with_ports(self) -> list[Endpoint]:
        """Endpoints that publish ports (what the firewall's port rules are made of)."""
        return list(self._with_ports.values())
