"""The single writer: every change to the topology goes through `Service`.

Theory of operation. A request is validated and decided by the pure core (IPAM, naming,
rules) against the in-memory topology, then applied to the kernel (links), the firewall
(iptables-restore) and the store (sqlite), in that order. Each step that succeeds is undone if
a later step fails, so a request either lands whole or changes nothing. The store is written
last: after a crash, anything the kernel holds that the store does not know is a leftover that
start-up adoption deletes (see `agent.adopt`).

Mutations are serialised by one `trio.Lock`; read-only requests answer from memory.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Iterable
from typing import Protocol

import msgspec
import trio

from agent.api import protocol as p
from agent.core import ipam, ipam6, naming, ports
from agent.core.errors import AgentError, Busy, Conflict, InvalidArgument, NotFound
from agent.core.model import Endpoint, Network, PortMapping, Sandbox
from agent.events import EventBus
from agent.log import get_logger
from agent.store.sqlite import Store

log = get_logger("agent.service")


class KernelOps(Protocol):
    async def ensure_bridge(
        self, *, name: str, alias: str, address: str, mtu: int = 1500, address6: str | None = None
    ) -> int: ...
    async def delete_bridge(
        self, name: str, address: str | None = None, address6: str | None = None
    ) -> bool: ...
    async def set_ip6_forward(self) -> None: ...
    async def attach(
        self,
        *,
        netns_path: str,
        bridge: str,
        host_ifname: str,
        alias: str,
        ifname: str,
        mac: str,
        mtu: int,
        address: str,
        gateway: str | None,
        address6: str | None = None,
        gateway6: str | None = None,
    ) -> None: ...
    async def detach(self, host_ifname: str) -> bool: ...
    async def enslave(self, host_ifname: str, bridge: str) -> None: ...
    async def set_up(self, name: str) -> None: ...
    async def link_state(self, name: str) -> tuple[bool, int] | None: ...
    async def owned_links(self) -> list: ...
    async def host_routes(self) -> list[ipaddress.IPv4Network]: ...


class FirewallOps(Protocol):
    async def sync(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> int: ...
    def text(self) -> str: ...
    def rule_count(self) -> int: ...


class NamespaceOps(Protocol):
    def resolve(self, netns: str) -> str: ...
    def netns_key(self, path: str) -> str: ...
    async def create_named(self, name: str) -> str: ...
    async def delete_named(self, name: str) -> bool: ...


class Topology:
    """The in-memory view: networks, endpoints, sandboxes and one address allocator per network."""

    def __init__(self, bitmap_cls: type) -> None:
        self.bitmap_cls = bitmap_cls
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.sandboxes: dict[str, Sandbox] = {}
        self.allocators: dict[str, ipam.AddressAllocator] = {}
        self.last_subnet: ipaddress.IPv4Network | None = None
        self.allocators6: dict[str, ipam6.AddressAllocator6] = {}  # dual-stack networks
        self.ula48: ipaddress.IPv6Network | None = None  # the host's ULA /48 (store meta)

    def add_network(self, net: Network) -> None:
        self.networks[net.id] = net
        self.allocators[net.id] = ipam.AddressAllocator(
            ipaddress.IPv4Network(net.subnet),
            ipaddress.IPv4Address(net.gateway),
            ipaddress.IPv4Network(net.ip_range) if net.ip_range else None,
            bitmap_cls=self.bitmap_cls,
        )
        for aux in net.aux_addresses.values():
            self.allocators[net.id].reserve(ipaddress.IPv4Address(aux))
        if net.ipv6 and net.subnet6 and net.gateway6:
            self.allocators6[net.id] = ipam6.AddressAllocator6(
                ipaddress.IPv6Network(net.subnet6), ipaddress.IPv6Address(net.gateway6)
            )

    def find_network(self, ref: str) -> Network:
        """By name, full id, or unique id prefix (like Docker)."""
        for net in self.networks.values():
            if net.name == ref or net.id == ref:
                return net
        matches = [n for n in self.networks.values() if ref and n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(f"network id prefix {ref!r} is ambiguous", network=ref)
        raise NotFound(f"network {ref!r} not found", network=ref)

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.network_id == network_id]

    def endpoints_in(self, netns_key: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.netns_key == netns_key]


class Service:
    """Requests of the control API, applied to kernel, firewall and store; one writer at a time."""

    def __init__(
        self,
        *,
        topo: Topology,
        kernel: KernelOps,
        firewall: FirewallOps,
        namespaces: NamespaceOps,
        store: Store,
        pools: tuple[ipam.Pool, ...] = ipam.DEFAULT_POOLS,
        bus: EventBus | None = None,
    ) -> None:
        self.topo = topo
        self.kernel = kernel
        self.firewall = firewall
        self.ns = namespaces
        self.store = store
        self.pools = pools
        self.bus = bus or EventBus()
        self.lock = _WriterLock(self)
        self.closing = False

    # -- networks --------------------------------------------------------------------------

    async def create_network(self, req: p.NetworkCreate, *, is_default: bool = False) -> Network:
        async with self.lock:
            return await self._create_network(req, is_default=is_default)

    async def _create_network(self, req: p.NetworkCreate, *, is_default: bool) -> Network:
        topo = self.topo
        naming.validate_network_name(req.name)
        if any(n.name == req.name for n in topo.networks.values()):
            raise Conflict(f"network with name {req.name!r} already exists", name=req.name)
        mtu = 1500 if req.mtu is None else req.mtu
        if not 68 <= mtu <= 65535:
            raise InvalidArgument(f"invalid MTU {mtu}: must be between 68 and 65535", field="mtu")
        for key in req.labels:
            if not key:
                raise InvalidArgument("label keys must not be empty", field="labels")
        net_id = secrets.token_hex(32)
        bridge = naming.DEFAULT_BRIDGE if is_default else naming.bridge_name(net_id)
        if req.bridge is not None:
            bridge = naming.validate_ifname(req.bridge)
        if any(n.bridge == bridge for n in topo.networks.values()):
            raise Conflict(f"bridge {bridge!r} is already used by another network", bridge=bridge)
        used = [ipaddress.IPv4Network(n.subnet) for n in topo.networks.values()]
        routes = [r for r in await self.kernel.host_routes() if r.prefixlen > 0 and r not in used]
        subnet, gateway, ip_range = ipam.plan_subnet(
            subnet=req.subnet,
            gateway=req.gateway,
            ip_range=req.ip_range,
            pools=self.pools,
            used=used,
            avoid=routes,
            after=topo.last_subnet,
        )
        _check_aux(req.aux_addresses, subnet, gateway, ip_range, self.topo.bitmap_cls)
        v6 = _plan_v6(topo, req)
        net = Network(
            ipv6=req.ipv6,
            subnet6=str(v6[0]) if v6 else None,
            gateway6=str(v6[1]) if v6 else None,
            aux_addresses=dict(req.aux_addresses),
            id=net_id,
            name=req.name,
            bridge=bridge,
            subnet=str(subnet),
            gateway=str(gateway),
            ip_range=str(ip_range) if ip_range else None,
            internal=req.internal,
            icc=req.icc,
            masquerade=req.masquerade,
            mtu=mtu,
            labels=dict(req.labels),
            is_default=is_default,
            created=time.time(),
        )
        await self._apply_new_network(net, subnet)
        if req.subnet is None:
            topo.last_subnet = subnet
        self.bus.publish("network", "created", net.id, name=net.name, bridge=net.bridge)
        log.info("network.create.complete", network_id=net.id, name=net.name, subnet=net.subnet)
        return net

    async def _apply_new_network(self, net: Network, subnet: ipaddress.IPv4Network) -> None:
        """Bridge, then rules, then store; each undone if a later one fails."""
        with trio.CancelScope(shield=True):
            await self.kernel.ensure_bridge(
                name=net.bridge,
                alias=naming.bridge_alias(net.id),
                address=f"{net.gateway}/{subnet.prefixlen}",
                mtu=net.mtu,
                address6=gateway6_cidr(net),
            )
            try:
                if net.ipv6:
                    await self.kernel.set_ip6_forward()
                await self.firewall.sync([*self.topo.networks.values(), net])
                try:
                    with self.store.transaction() as w:
                        w.put_network(net)
                        if net.ipv6 and self.topo.ula48 is not None:
                            w.set_meta("ula48", str(self.topo.ula48))
                        if net.ip_range is None and not net.is_default:
                            w.set_meta("last_subnet", net.subnet)
                except BaseException:
                    await self.firewall.sync(self.topo.networks.values())
                    raise
            except BaseException:
                await self.kernel.delete_bridge(net.bridge)
                raise
        self.topo.add_network(net)

    def list_networks(self, req: p.NetworkFilter) -> list[Network]:
        nets = [n for n in self.topo.networks.values() if _labels_match(n, req.labels)]
        return sorted(nets, key=lambda n: (n.created, n.name))

    def inspect_network(self, req: p.NetworkRef) -> p.NetworkView:
        net = self.topo.find_network(req.network)
        eps = sorted(self.topo.endpoints_of(net.id), key=lambda e: ipaddress.IPv4Address(e.ip))
        return p.NetworkView(network=net, endpoints=eps)

    async def remove_network(self, req: p.NetworkRemove) -> p.Removed:
        async with self.lock:
            net = self.topo.find_network(req.network)
            await self._remove_network(net, force=req.force)
            return p.Removed(removed=[net.name])

    async def _remove_network(self, net: Network, *, force: bool) -> None:
        if net.is_default:
            raise InvalidArgument(
                f"{net.name!r} is the default network and cannot be removed", network=net.name
            )
        eps = self.topo.endpoints_of(net.id)
        if eps and not force:
            raise Busy(
                f"network {net.name!r} has {len(eps)} active endpoint(s): disconnect them "
                "or use --force",
                network=net.name,
                endpoints=len(eps),
            )
        for ep in eps:
            await self._disconnect(ep)
        remaining = [n for n in self.topo.networks.values() if n.id != net.id]
        with trio.CancelScope(shield=True):
            await self.firewall.sync(remaining)
            await self.kernel.delete_bridge(net.bridge, _gateway_cidr(net), gateway6_cidr(net))
            with self.store.transaction() as w:
                w.delete_network(net.id)
        del self.topo.networks[net.id]
        del self.topo.allocators[net.id]
        self.topo.allocators6.pop(net.id, None)
        self.bus.publish("network", "removed", net.id, name=net.name)
        log.info("network.remove.complete", network_id=net.id, name=net.name)

    async def prune_networks(self, req: p.NetworkFilter) -> p.Removed:
        async with self.lock:
            removed: list[str] = []
            for net in self.list_networks(req):
                if net.is_default or self.topo.endpoints_of(net.id):
                    continue
                await self._remove_network(net, force=False)
                removed.append(net.name)
            return p.Removed(removed=removed)

    # -- endpoints ------------------------------------------------------------------------

    async def connect(self, req: p.EndpointConnect, *, sandbox: str | None = None) -> Endpoint:
        async with self.lock:
            return await self._connect(req, sandbox=sandbox)

    async def _connect(self, req: p.EndpointConnect, *, sandbox: str | None) -> Endpoint:
        topo = self.topo
        net = topo.find_network(req.network)
        path = self.ns.resolve(req.netns)
        key = self.ns.netns_key(path)
        present = topo.endpoints_in(key)
        if any(e.network_id == net.id for e in present):
            raise Conflict(
                f"namespace {req.netns!r} is already connected to network {net.name!r}",
                network=net.name,
                netns=req.netns,
            )
        requested = _parse_ip(req.ip) if req.ip is not None else None
        mac = ipam.validate_mac(req.mac) if req.mac is not None else None
        published = self._new_ports(net, req.ports, ())
        alloc = topo.allocators[net.id]
        alloc6 = _allocator6(topo, net, req.ip6)
        ip = alloc.allocate(requested)
        try:
            ip6 = alloc6.allocate(_ip6_of(req.ip6)) if alloc6 is not None else None
        except BaseException:
            alloc.release(ip)
            raise
        try:
            ep_id = secrets.token_hex(32)
            taken = {e.ifname for e in present}
            ifname = next(
                n for i in range(len(taken) + 1) if (n := naming.container_ifname(i)) not in taken
            )
            # one default route per namespace: the first non-internal network's (like Docker)
            route = not net.internal and not any(e.default_route for e in present)
            ep = Endpoint(
                default_route=route,
                id=ep_id,
                network_id=net.id,
                netns=path,
                netns_key=key,
                ifname=ifname,
                host_ifname=naming.host_veth_name(ep_id),
                ip=str(ip),
                mac=mac or ipam.mac_for(ip),
                sandbox=sandbox,
                ports=published,
                ip6=str(ip6) if ip6 is not None else None,
            )
            prefix = ipaddress.IPv4Network(net.subnet).prefixlen
            with trio.CancelScope(shield=True):
                await self.kernel.attach(
                    netns_path=path,
                    bridge=net.bridge,
                    host_ifname=ep.host_ifname,
                    alias=naming.veth_alias(ep.id),
                    ifname=ifname,
                    mac=ep.mac,
                    mtu=net.mtu,
                    address=f"{ip}/{prefix}",
                    gateway=net.gateway if route else None,
                    **attach6_args(net, ep),
                )
                try:
                    if ep.ports:
                        await self._sync_ports([*topo.endpoints.values(), ep])
                    try:
                        with self.store.transaction() as w:
                            w.put_endpoint(ep)
                            w.set_meta(f"cursor:{net.id}", str(alloc.cursor))
                            if alloc6 is not None:
                                w.set_meta(f"cursor6:{net.id}", str(alloc6.cursor))
                    except BaseException:
                        if ep.ports:
                            await self._sync_ports(topo.endpoints.values())
                        raise
                except BaseException:
                    await self.kernel.detach(ep.host_ifname)
                    raise
        except BaseException:
            alloc.release(ip)
            if ip6 is not None and alloc6 is not None:
                alloc6.release(ip6)
            raise
        topo.endpoints[ep.id] = ep
        log.info("endpoint.connect.complete", endpoint_id=ep.id, network=net.name, ip=ep.ip)
        self.bus.publish("endpoint", "connected", ep.id, network=net.name, netns=ep.netns, ip=ep.ip)
        return ep

    async def disconnect(self, req: p.EndpointDisconnect) -> Endpoint:
        async with self.lock:
            net = self.topo.find_network(req.network)
            path = self.ns.resolve(req.netns)
            try:
                key = self.ns.netns_key(path)
            except NotFound:
                key = None
            for ep in self.topo.endpoints_of(net.id):
                if ep.netns_key == key or (key is None and ep.netns == path):
                    await self._disconnect(ep)
                    return ep
            raise NotFound(
                f"namespace {req.netns!r} is not connected to network {net.name!r}",
                network=net.name,
                netns=req.netns,
            )

    async def _disconnect(self, ep: Endpoint, *, action: str = "disconnected") -> None:
        """Delete the veth (if still there), then forget the endpoint and free its address."""
        with trio.CancelScope(shield=True):
            if ep.ports:  # its rules go first: nothing is DNATed to a vanishing address
                await self._sync_ports(e for e in self.topo.endpoints.values() if e.id != ep.id)
            await self.kernel.detach(ep.host_ifname)
            with self.store.transaction() as w:
                w.delete_endpoint(ep.id)
        self.topo.allocators[ep.network_id].release(ipaddress.IPv4Address(ep.ip))
        if ep.ip6 and ep.network_id in self.topo.allocators6:
            self.topo.allocators6[ep.network_id].release(ipaddress.IPv6Address(ep.ip6))
        del self.topo.endpoints[ep.id]
        log.info(f"endpoint.{action}.complete", endpoint_id=ep.id, ip=ep.ip)
        net = self.topo.networks[ep.network_id]
        self.bus.publish("endpoint", action, ep.id, network=net.name, netns=ep.netns, ip=ep.ip)

    async def release_vanished(self, host_ifname: str) -> Endpoint | None:
        """The veth of an endpoint is gone (its namespace was deleted, or the veth by hand):
        release the endpoint. None when it is not (or no longer) an endpoint of ours."""
        async with self.lock:
            return await self._release_vanished(host_ifname)

    async def _release_vanished(self, host_ifname: str) -> Endpoint | None:
        ep = next((e for e in self.topo.endpoints.values() if e.host_ifname == host_ifname), None)
        if ep is None:
            return None
        await self._disconnect(ep, action="released")
        if ep.sandbox and ep.sandbox in self.topo.sandboxes:
            await self._forget_sandbox_if_gone(ep.sandbox)
        return ep

    async def _forget_sandbox_if_gone(self, name: str) -> None:
        sb = self.topo.sandboxes[name]
        try:
            alive = self.ns.netns_key(sb.path) == sb.netns_key
        except AgentError:
            alive = False
        if not alive:
            await self.ns.delete_named(name)
            with self.store.transaction() as w:
                w.delete_sandbox(name)
            del self.topo.sandboxes[name]

    def list_endpoints(self, req: p.EndpointFilter) -> list[Endpoint]:
        eps = list(self.topo.endpoints.values())
        if req.network is not None:
            net = self.topo.find_network(req.network)
            eps = [e for e in eps if e.network_id == net.id]
        return sorted(eps, key=lambda e: (e.netns, e.ifname))

    # -- sandboxes (agent-managed named namespaces) -----------------------------------------

    async def run(self, req: p.SandboxRun) -> Endpoint:
        async with self.lock:
            naming.validate_netns_name(req.name)
            if req.name in self.topo.sandboxes:
                raise Conflict(f"sandbox {req.name!r} already exists", name=req.name)
            net = self.topo.find_network(req.network)  # before anything is created
            path = await self.ns.create_named(req.name)
            try:
                sb = Sandbox(name=req.name, path=path, netns_key=self.ns.netns_key(path))
                with self.store.transaction() as w:
                    w.put_sandbox(sb)
                try:
                    ep = await self._connect(
                        p.EndpointConnect(
                            network=net.id,
                            netns=path,
                            ip=req.ip,
                            mac=req.mac,
                            ports=req.ports,
                            ip6=req.ip6,
                        ),
                        sandbox=req.name,
                    )
                except BaseException:
                    with self.store.transaction() as w:
                        w.delete_sandbox(req.name)
                    raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.ns.delete_named(req.name)
                raise
            self.topo.sandboxes[req.name] = sb
            return ep

    async def remove_sandbox(self, req: p.SandboxRemove) -> p.Removed:
        async with self.lock:
            sb = self.topo.sandboxes.get(req.name)
            if sb is None:
                raise NotFound(f"sandbox {req.name!r} not found", name=req.name)
            for ep in self.topo.endpoints_in(sb.netns_key):
                await self._disconnect(ep)
            with trio.CancelScope(shield=True):
                await self.ns.delete_named(sb.name)
                with self.store.transaction() as w:
                    w.delete_sandbox(sb.name)
            del self.topo.sandboxes[sb.name]
            return p.Removed(removed=[sb.name])

    # -- published ports -----------------------------------------------------------------

    def _new_ports(
        self, net: Network, specs: list[str], current: tuple[PortMapping, ...]
    ) -> tuple[PortMapping, ...]:
        """`current` plus the mappings of `specs`, validated against every published port."""
        if not specs:
            return current
        wanted = ports.parse_all(specs)
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
        taken = [m for e in self.topo.endpoints.values() for m in e.ports]
        ports.check_free(wanted, taken)
        return tuple(sorted((*current, *wanted)))

    async def _sync_ports(self, endpoints: Iterable[Endpoint]) -> None:
        await self.firewall.sync(self.topo.networks.values(), list(endpoints))

    def _endpoint_of(self, req: p.PortChange) -> Endpoint:
        key = self.ns.netns_key(self.ns.resolve(req.netns))
        eps = self.topo.endpoints_in(key)
        if req.network is not None:
            net_id = self.topo.find_network(req.network).id
            eps = [e for e in eps if e.network_id == net_id]
        if len(eps) == 1:
            return eps[0]
        if not eps:
            raise NotFound(f"namespace {req.netns!r} has no endpoint here", netns=req.netns)
        raise InvalidArgument(
            f"namespace {req.netns!r} is on {len(eps)} networks: name one with --network",
            netns=req.netns,
        )

    async def publish(self, req: p.PortChange) -> Endpoint:
        """Add published ports to an endpoint (all of them or none)."""
        async with self.lock:
            ep = self._endpoint_of(req)
            net = self.topo.networks[ep.network_id]
            return await self._replace_ports(ep, self._new_ports(net, req.ports, ep.ports))

    async def unpublish(self, req: p.PortChange) -> Endpoint:
        """Remove published ports (each must be published on this endpoint) and their flows."""
        async with self.lock:
            ep = self._endpoint_of(req)
            gone = set(ports.parse_all(req.ports))
            for m in sorted(gone - set(ep.ports)):
                raise NotFound(
                    f"port {ports.format_spec(m)} is not published by this endpoint",
                    port=ports.format_spec(m),
                )
            return await self._replace_ports(ep, tuple(m for m in ep.ports if m not in gone))

    async def _replace_ports(self, ep: Endpoint, new: tuple[PortMapping, ...]) -> Endpoint:
        updated = msgspec.structs.replace(ep, ports=new)
        others = [e for e in self.topo.endpoints.values() if e.id != ep.id]
        with trio.CancelScope(shield=True):
            await self._sync_ports([*others, updated])
            try:
                with self.store.transaction() as w:
                    w.put_endpoint(updated)
            except BaseException:
                await self._sync_ports([*others, ep])
                raise
        self.topo.endpoints[ep.id] = updated
        log.info("endpoint.ports.complete", endpoint_id=ep.id, ports=len(new))
        return updated


def _check_aux(
    aux: dict[str, str],
    subnet: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
    ip_range: ipaddress.IPv4Network | None,
    bitmap_cls: type,
) -> None:
    """Refuse --aux-address values that are not free addresses of the subnet."""
    if not aux:
        return
    trial = ipam.AddressAllocator(subnet, gateway, ip_range, bitmap_cls=bitmap_cls)
    for name, text in aux.items():
        try:
            trial.reserve(_parse_ip(text))
        except AgentError as exc:
            message = f"--aux-address {name}={text}: {exc.message}"
            raise type(exc)(message, field="aux_addresses") from exc


def _gateway_cidr(net: Network) -> str:
    return f"{net.gateway}/{ipaddress.IPv4Network(net.subnet).prefixlen}"


def gateway6_cidr(net: Network) -> str | None:
    if not (net.ipv6 and net.subnet6 and net.gateway6):
        return None
    return f"{net.gateway6}/{ipaddress.IPv6Network(net.subnet6).prefixlen}"


def attach6_args(net: Network, ep: Endpoint) -> dict[str, str | None]:
    """The IPv6 keyword arguments of `kernel.attach` for `ep` (none on an IPv4-only network)."""
    if not (ep.ip6 and net.subnet6):
        return {}
    prefix = ipaddress.IPv6Network(net.subnet6).prefixlen
    return {
        "address6": f"{ep.ip6}/{prefix}",
        "gateway6": net.gateway6 if ep.default_route else None,
    }


def _plan_v6(
    topo: Topology, req: p.NetworkCreate
) -> tuple[ipaddress.IPv6Network, ipaddress.IPv6Address] | None:
    """The IPv6 subnet and gateway of a new network, or None when it is IPv4 only.

    Without a given IPv6 subnet, a /64 of the host's ULA /48 (drawn now if there is none yet;
    the caller persists `topo.ula48` with the network).
    """
    if not req.ipv6:
        if req.subnet6 is not None or req.gateway6 is not None:
            raise InvalidArgument(
                "an IPv6 subnet or gateway needs --ipv6", subnet6=req.subnet6, field="ipv6"
            )
        return None
    used = [
        ipaddress.IPv6Network(n.subnet6) for n in topo.networks.values() if n.ipv6 and n.subnet6
    ]
    base = topo.ula48
    if base is None and req.subnet6 is None:
        base = topo.ula48 = ipam6.ula48(secrets.randbits(40))
    return ipam6.plan_subnet6(
        subnet=req.subnet6,
        gateway=req.gateway6,
        base=base or ipaddress.IPv6Network("fd00::/48"),
        used=used,
    )


def _allocator6(topo: Topology, net: Network, ip6: str | None) -> ipam6.AddressAllocator6 | None:
    alloc6 = topo.allocators6.get(net.id)
    if alloc6 is None and ip6 is not None:
        raise InvalidArgument(
            f"network {net.name!r} is not IPv6-enabled: --ip6 cannot be used", field="ip6"
        )
    return alloc6


def _ip6_of(text: str | None) -> ipaddress.IPv6Address | None:
    return None if text is None else ipam6.parse_address6(text, "IPv6 address")


def _labels_match(net: Network, filters: list[str]) -> bool:
    for f in filters:
        key, eq, value = f.partition("=")
        if key not in net.labels or (eq and net.labels[key] != value):
            return False
    return True


def _parse_ip(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid IPv4 address {text!r}", field="ip") from exc


__all__ = ["AgentError", "Service", "Topology"]


class _WriterLock:
    """The single-writer lock; once the agent is stopping, a request gets Busy, not a wait."""

    def __init__(self, svc: Service) -> None:
        self._svc = svc
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        if self._svc.closing:
            self._lock.release()
            raise Busy("agentd is shutting down; retry when it is back", reason="shutdown")

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    async def drain(self) -> None:
        """Wait for the request being applied (if any) to finish; new ones then get Busy."""
        self._svc.closing = True
        async with self._lock:
            pass

    def locked(self) -> bool:
        return self._lock.locked()
