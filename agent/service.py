"""Every change to the topology goes through `Service`.

Theory of operation. A request is validated and decided by the pure core (IPAM, naming,
rules) against the in-memory topology, then applied to the kernel (links), the firewall
(iptables-restore) and the store (sqlite), in that order. Each step that succeeds is undone if
a later step fails, so a request either lands whole or changes nothing. The store is written
last: after a crash, anything the kernel holds that the store does not know is a leftover that
start-up adoption deletes (see `agent.adopt`).

Mutations take the topology lock (`agent.locks`): endpoint requests in shared mode with a
per-namespace lock, everything network-wide exclusively; read-only requests answer from memory. A
disconnect only cuts its veth off (one netlink message) and leaves the slow kernel deletion to
`agent.reaper`, which deletes many at once; see there for what waits for it.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import trio

from agent.api import protocol as p
from agent.core import ipam, ipam6, naming, policy
from agent.core.errors import AgentError, Busy, Conflict, InvalidArgument, NotFound, PoolExhausted
from agent.core.model import Endpoint, Network, Sandbox
from agent.core.topology import Topology
from agent.events import EventBus
from agent.locks import KeyedLocks, TopologyLock
from agent.log import get_logger
from agent.reaper import Reaper
from agent.service_ports import PortsMixin
from agent.store.sqlite import Store

log = get_logger("agent.service")

# A Linux bridge holds at most 1023 ports (BR_MAX_PORTS = 1024, port 0 reserved): refuse the
# 1024th endpoint before touching the kernel, which would answer "Exchange full".
MAX_BRIDGE_PORTS = 1023


class KernelOps(Protocol):
    async def ensure_bridge(
        self, *, name: str, alias: str, address: str, mtu: int = 1500, address6: str | None = None
    ) -> int: ...
    async def delete_bridge(
        self,
        name: str,
        address: str | None = None,
        address6: str | None = None,
        *,
        retire: bool = False,
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
    ) -> bool: ...
    async def detach(self, host_ifname: str) -> bool: ...
    async def retire(self, host_ifname: str) -> bool: ...
    async def reap(self, bridges: Sequence[tuple[str, str | None, str | None]] = ()) -> bool: ...
    async def enslave(self, host_ifname: str, bridge: str) -> None: ...
    async def set_up(self, name: str) -> None: ...
    async def link_state(self, name: str) -> tuple[bool, int] | None: ...
    async def owned_links(self) -> list: ...
    async def host_routes(self) -> list[ipaddress.IPv4Network]: ...


class FirewallOps(Protocol):
    async def apply(self, policy: policy.Policy) -> int: ...
    def text(self) -> str: ...
    def rule_count(self) -> int: ...


class NamespaceOps(Protocol):
    def resolve(self, netns: str) -> str: ...
    def netns_key(self, path: str) -> str: ...
    async def create_named(self, name: str) -> str: ...
    async def delete_named(self, name: str) -> bool: ...


class Service(PortsMixin):
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
        reaper: Reaper | None = None,
    ) -> None:
        self.topo = topo
        self.kernel = kernel
        self.firewall = firewall
        self.ns = namespaces
        self.store = store
        self.pools = pools
        self.bus = bus or EventBus()
        self.reaper = reaper or Reaper(kernel, self._release_address)
        self.lock = TopologyLock()
        self._netns_locks = KeyedLocks()
        self._dying_subnets: dict[str, ipaddress.IPv4Network] = {}  # bridge key -> its subnet

    # -- networks --------------------------------------------------------------------------

    async def create_network(self, req: p.NetworkCreate, *, is_default: bool = False) -> Network:
        dying = None if req.bridge is None else self.reaper.pending(f"br:{req.bridge}")
        if dying is not None:
            await dying.wait()  # a bridge of that name is being deleted: let it go first
        async with self.lock:
            await self._wait_for_dying_subnets(req.subnet)  # under the lock: no rm slips in
            return await self._create_network(req, is_default=is_default)

    async def _wait_for_dying_subnets(self, subnet: str | None) -> None:
        """A removed network's bridge keeps its gateway address until the reaper deletes it: an
        explicit subnet overlapping it waits for that (a chosen one avoids it as a host route)."""
        for key, old in list(self._dying_subnets.items()):
            dying = self.reaper.pending(key)
            if dying is None:
                del self._dying_subnets[key]
            elif subnet is not None and _overlaps(subnet, old):
                await dying.wait()

    async def _create_network(self, req: p.NetworkCreate, *, is_default: bool) -> Network:
        topo = self.topo
        naming.validate_network_name(req.name)
        if topo.has_network_named(req.name):
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
        if topo.network_of_bridge(bridge) is not None:
            raise Conflict(f"bridge {bridge!r} is already used by another network", bridge=bridge)
        if self.reaper.pending(f"br:{bridge}") is not None:
            raise Busy(f"bridge {bridge!r} is being deleted; retry", bridge=bridge)
        used = topo.subnets()
        ours = set(used)
        routes = [r for r in await self.kernel.host_routes() if r.prefixlen > 0 and r not in ours]
        subnet, gateway, ip_range = ipam.plan_subnet(
            subnet=req.subnet,
            gateway=req.gateway,
            ip_range=req.ip_range,
            pools=self.pools,
            used=used,
            avoid=routes,
            after=topo.last_subnet,
        )
        _check_aux(req.aux_addresses, subnet, gateway, ip_range, self.topo.range_allocator)
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
        """Bridge and rules at once (the rules only name the bridge), then store; whatever
        succeeded is undone if anything fails."""
        failed: list[Exception] = []

        made: list[bool] = []
        synced: list[bool] = []

        async def bridge() -> None:
            await self.kernel.ensure_bridge(
                name=net.bridge,
                alias=naming.bridge_alias(net.id),
                address=f"{net.gateway}/{subnet.prefixlen}",
                mtu=net.mtu,
                address6=gateway6_cidr(net),
            )
            made.append(True)
            if net.ipv6:
                await self.kernel.set_ip6_forward()

        async def rules() -> None:
            await self.firewall.apply(
                policy.build([*self.topo.networks.values(), net], self.topo.with_ports())
            )
            synced.append(True)

        async def step(fn: Any) -> None:
            try:
                await fn()
            except Exception as exc:  # kept, so that the other step is undone, not orphaned
                failed.append(exc)

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(step, bridge)
                nursery.start_soon(step, rules)
            if not failed:
                try:
                    with self.store.transaction() as w:
                        w.put_network(net)
                        if net.ipv6 and self.topo.ula48 is not None:
                            w.set_meta("ula48", str(self.topo.ula48))
                        if net.ip_range is None and not net.is_default:
                            w.set_meta("last_subnet", net.subnet)
                except Exception as exc:
                    failed.append(exc)
            if failed:
                if synced:
                    await self.firewall.apply(
                        policy.build(self.topo.networks.values(), self.topo.with_ports())
                    )
                if made:
                    await self.kernel.delete_bridge(
                        net.bridge, _gateway_cidr(net), gateway6_cidr(net)
                    )
                raise failed[0]
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
        await self._forget_networks([net])

    async def _forget_networks(self, nets: list[Network]) -> None:
        """Rules of `nets` (endpoint-free) gone in one transaction, then the store; their
        bridges go to the reaper. Rules are put back if the store fails."""
        gone = {net.id for net in nets}
        remaining = [n for n in self.topo.networks.values() if n.id not in gone]
        with trio.CancelScope(shield=True):
            await self.firewall.apply(policy.build(remaining, self.topo.with_ports()))
            try:
                with self.store.transaction() as w:
                    for net in nets:
                        w.delete_network(net.id)
            except BaseException:
                await self.firewall.apply(
                    policy.build(self.topo.networks.values(), self.topo.with_ports())
                )
                raise
        for net in nets:
            self.topo.remove_network(net.id)
            # the bridge has no port and no rule left: the reaper retires and deletes it (a
            # netlink message now would wait for a batch delete in progress)
            self.reaper.retire_bridge(net.bridge, _gateway_cidr(net), gateway6_cidr(net))
            self._dying_subnets[f"br:{net.bridge}"] = ipaddress.IPv4Network(net.subnet)
            self.bus.publish("network", "removed", net.id, name=net.name)
            log.info("network.remove.complete", network_id=net.id, name=net.name)

    async def prune_networks(self, req: p.NetworkFilter) -> p.Removed:
        """Every unused network matching the filter, removed in one firewall transaction (each
        network's own `rm` would pay nf_tables' ~15 ms deletion wait twice)."""
        async with self.lock:
            unused = [
                net
                for net in self.list_networks(req)
                if not net.is_default and not self.topo.endpoints_of(net.id)
            ]
            if unused:
                await self._forget_networks(unused)
            return p.Removed(removed=[net.name for net in unused])

    # -- endpoints ------------------------------------------------------------------------

    async def connect(self, req: p.EndpointConnect, *, sandbox: str | None = None) -> Endpoint:
        path = self.ns.resolve(req.netns)
        key = self.ns.netns_key(path)
        async with self._netns_locks.hold(key):
            # the namespace's previous interface may still be dying (its eth0 name taken)
            if (dying := self.reaper.pending(f"ns:{key}")) is not None:
                await dying.wait()
            # a port mapping is checked against every other one: that takes the whole lock
            async with self.lock if req.ports else self.lock.shared():
                return await self._connect(req, path, key, sandbox=sandbox)

    async def _connect(
        self, req: p.EndpointConnect, path: str, key: str, *, sandbox: str | None
    ) -> Endpoint:
        """Decide and reserve (synchronously), then apply; the reservation is undone on failure.
        `path` is `req.netns` resolved, `key` its namespace's identity."""
        net = self.topo.find_network(req.network)
        reserved = self._reserve_endpoint(req, net, path, key, sandbox)
        try:
            ep = await self._apply_endpoint(reserved, net, ip6_requested=req.ip6 is not None)
        except BaseException:
            self.topo.remove_endpoint(reserved.id)
            self._release_address(reserved.network_id, reserved.ip, reserved.ip6)
            raise
        if ep.ip6 != reserved.ip6:  # IPv6 disabled in the namespace: its address is not used
            self._release_address(ep.network_id, None, reserved.ip6)
        log.info("endpoint.connect.complete", endpoint_id=ep.id, network=net.name, ip=ep.ip)
        self.bus.publish("endpoint", "connected", ep.id, network=net.name, netns=ep.netns, ip=ep.ip)
        return ep

    def _reserve_endpoint(
        self, req: p.EndpointConnect, net: Network, path: str, key: str, sandbox: str | None
    ) -> Endpoint:
        """Validate, take the addresses and put the endpoint in the topology, with no await in
        between: concurrent requests then see its name, default route and addresses."""
        topo = self.topo
        present = topo.endpoints_in(key)
        if any(e.network_id == net.id for e in present):
            raise Conflict(
                f"namespace {req.netns!r} is already connected to network {net.name!r}",
                network=net.name,
                netns=req.netns,
            )
        if topo.count_of(net.id) >= MAX_BRIDGE_PORTS:
            raise PoolExhausted(
                f"network {net.name!r} has {MAX_BRIDGE_PORTS} endpoints, the most a Linux "
                "bridge can hold",
                network=net.name,
            )
        requested = _parse_ip(req.ip) if req.ip is not None else None
        mac = ipam.validate_mac(req.mac) if req.mac is not None else None
        published = self._new_ports(net, req.ports, ())
        alloc, alloc6 = topo.allocators[net.id], _allocator6(topo, net, req.ip6)
        ip = alloc.allocate(requested)
        try:
            ip6 = alloc6.allocate(_ip6_of(req.ip6)) if alloc6 is not None else None
        except BaseException:
            alloc.release(ip)
            raise
        ep_id = secrets.token_hex(32)
        taken = {e.ifname for e in present}
        ifname = next(
            n for i in range(len(taken) + 1) if (n := naming.container_ifname(i)) not in taken
        )
        ep = Endpoint(
            # one default route per namespace: the first non-internal network's (like Docker)
            default_route=not net.internal and not any(e.default_route for e in present),
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
        topo.add_endpoint(ep)
        return ep

    async def _apply_endpoint(
        self, ep: Endpoint, net: Network, *, ip6_requested: bool = False
    ) -> Endpoint:
        """Kernel, then port rules, then store; each undone if a later one fails. Returns the
        endpoint as applied: without its IPv6 address if the namespace has IPv6 disabled (as
        Docker does it), unless that address was asked for (InvalidArgument, nothing changed).
        """
        topo = self.topo
        with trio.CancelScope(shield=True):
            ipv6 = await self.kernel.attach(**attach_args(net, ep))
            try:
                if not ipv6 and ep.ip6 is not None:
                    if ip6_requested:
                        raise InvalidArgument(
                            f"namespace {ep.netns!r} has IPv6 disabled: it cannot have {ep.ip6}",
                            netns=ep.netns,
                            ip6=ep.ip6,
                        )
                    ep = msgspec.structs.replace(ep, ip6=None)
                    topo.add_endpoint(ep)  # replaces it: no IPv6 port rules, none stored
                if ep.ports:
                    await self._sync_ports(topo.with_ports())
                try:
                    with self.store.transaction() as w:
                        w.put_endpoint(ep)
                        w.set_meta(f"cursor:{net.id}", str(topo.allocators[net.id].cursor))
                        if (alloc6 := topo.allocators6.get(net.id)) is not None:
                            w.set_meta(f"cursor6:{net.id}", str(alloc6.cursor))
                except BaseException:
                    if ep.ports:
                        await self._sync_ports(e for e in topo.with_ports() if e.id != ep.id)
                    raise
            except BaseException:
                await self.kernel.detach(ep.host_ifname)
                raise
        return ep

    async def disconnect(self, req: p.EndpointDisconnect) -> Endpoint:
        path = self.ns.resolve(req.netns)
        try:
            key = self.ns.netns_key(path)
        except NotFound:  # the namespace is gone: find its endpoint by the path it was given
            key = None
        async with self._netns_locks.hold(key or path), self.lock.shared():
            net = self.topo.find_network(req.network)
            matches = self.topo.endpoints_in(key) if key else self.topo.endpoints_of(net.id)
            for ep in matches:
                if ep.network_id == net.id and (key is not None or ep.netns == path):
                    await self._disconnect(ep)
                    return ep
            raise NotFound(
                f"namespace {req.netns!r} is not connected to network {net.name!r}",
                network=net.name,
                netns=req.netns,
            )

    async def _disconnect(self, ep: Endpoint, *, action: str = "disconnected") -> None:
        """Cut the veth off (the reaper deletes it), forget the endpoint; its address returns
        to the pool once the veth is gone (at once if it was gone already)."""
        with trio.CancelScope(shield=True):
            if ep.ports:  # its rules go first: nothing is DNATed to a vanishing address
                await self._sync_ports(e for e in self.topo.with_ports() if e.id != ep.id)
            retired = await self.kernel.retire(ep.host_ifname)
            with self.store.transaction() as w:
                w.delete_endpoint(ep.id)
        self.topo.remove_endpoint(ep.id)
        if retired:
            self.reaper.retired_endpoint(ep.network_id, ep.ip, ep.ip6, f"ns:{ep.netns_key}")
        else:
            self._release_address(ep.network_id, ep.ip, ep.ip6)
        log.info(f"endpoint.{action}.complete", endpoint_id=ep.id, ip=ep.ip)
        net = self.topo.networks[ep.network_id]
        self.bus.publish("endpoint", action, ep.id, network=net.name, netns=ep.netns, ip=ep.ip)

    async def release_vanished(self, host_ifname: str) -> Endpoint | None:
        """The veth of an endpoint is gone (its namespace was deleted, or the veth by hand):
        release the endpoint. None when it is not (or no longer) an endpoint of ours."""
        async with self.lock:
            return await self._release_vanished(host_ifname)

    async def _release_vanished(self, host_ifname: str) -> Endpoint | None:
        ep = self.topo.endpoint_of_veth(host_ifname)
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
                key = self.ns.netns_key(path)
                sb = Sandbox(name=req.name, path=path, netns_key=key)
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
                        path,
                        key,
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

    def _release_address(self, network_id: str, ip: str | None, ip6: str | None = None) -> None:
        """Back to the pool, if its network still exists (a forced rm may have gone first)."""
        alloc = self.topo.allocators.get(network_id)
        if ip and alloc is not None and alloc.is_allocated(ipaddress.IPv4Address(ip)):
            alloc.release(ipaddress.IPv4Address(ip))
        alloc6 = self.topo.allocators6.get(network_id)
        if ip6 and alloc6 is not None and alloc6.is_allocated(ipaddress.IPv6Address(ip6)):
            alloc6.release(ipaddress.IPv6Address(ip6))

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


def _check_aux(
    aux: dict[str, str],
    subnet: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
    ip_range: ipaddress.IPv4Network | None,
    range_allocator: Callable[..., ipam.RangeAllocator],
) -> None:
    """Refuse --aux-address values that are not free addresses of the subnet."""
    if not aux:
        return
    trial = ipam.AddressAllocator(subnet, gateway, ip_range, range_allocator=range_allocator)
    for name, text in aux.items():
        try:
            trial.reserve(_parse_ip(text))
        except AgentError as exc:
            message = f"--aux-address {name}={text}: {exc.message}"
            raise type(exc)(message, field="aux_addresses") from exc


def _overlaps(subnet: str, other: ipaddress.IPv4Network) -> bool:
    """Whether the (not yet validated) `subnet` text overlaps `other`; False if malformed."""
    try:
        return ipaddress.ip_network(subnet.strip(), strict=False).overlaps(other)
    except ValueError:
        return False


def _gateway_cidr(net: Network) -> str:
    return f"{net.gateway}/{ipaddress.IPv4Network(net.subnet).prefixlen}"


def gateway6_cidr(net: Network) -> str | None:
    if not (net.ipv6 and net.subnet6 and net.gateway6):
        return None
    return f"{net.gateway6}/{ipaddress.IPv6Network(net.subnet6).prefixlen}"


def attach_args(net: Network, ep: Endpoint) -> dict[str, Any]:
    """The keyword arguments of `kernel.attach` for `ep` (connect, and re-attach at start-up)."""
    args: dict[str, Any] = {
        "netns_path": ep.netns,
        "bridge": net.bridge,
        "host_ifname": ep.host_ifname,
        "alias": naming.veth_alias(ep.id),
        "ifname": ep.ifname,
        "mac": ep.mac,
        "mtu": net.mtu,
        "address": f"{ep.ip}/{ipaddress.IPv4Network(net.subnet).prefixlen}",
        "gateway": net.gateway if ep.default_route else None,
    }
    if ep.ip6 and net.subnet6:  # dual stack
        args["address6"] = f"{ep.ip6}/{ipaddress.IPv6Network(net.subnet6).prefixlen}"
        args["gateway6"] = net.gateway6 if ep.default_route else None
    return args


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
