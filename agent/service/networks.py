"""Network requests: create, list, inspect, remove, prune.

Theory of operation. A create is decided by the core (`plan.plan_network`) against the
topology and the host's routes (kept up to date from the kernel worker's route changes, not
dumped per create: `refresh_routes`), then applied: the bridge and the firewall rules at once (the
rules only name the bridge), then the store. Whatever succeeded is undone if a later step
fails, and the first error is the one reported. A removal takes the rules out in one
transaction, then the store; the bridge, with no port and no rule left, goes to the reaper,
which deletes it with its next batch (a netlink message now would wait for a batch delete in
progress). Until then its gateway address still sits on the host, so an explicit subnet
overlapping it waits for the deletion, and a chosen one avoids it as a host route.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Iterable

import trio

from agent.core import blocks, ipam, names, plan
from agent.core.attach import bridge_of
from agent.core.errors import Busy, InvalidArgument
from agent.core.model import Endpoint, Network
from agent.log import get_logger
from agent.service.context import Shared, undo
from agent.service.endpoints import Endpoints

log = get_logger("agent.service.networks")


class Networks:
    """Network requests (each takes the topology lock exclusively, except reads)."""

    def __init__(self, shared: Shared, endpoints: Endpoints) -> None:
        self.s = shared
        self.endpoints = endpoints
        self._dying_subnets: dict[str, ipaddress.IPv4Network] = {}  # reaper key -> its subnet
        self._routes_lock = trio.Lock()  # route changes are applied in the order they came

    async def create(self, spec: plan.NetworkSpec) -> Network:
        """Create the network `spec` asks for; all or nothing."""
        s = self.s
        dying = None if spec.bridge is None else s.reaper.pending(f"br:{spec.bridge}")
        if dying is not None:
            await dying.wait()  # a bridge of that name is being deleted: let it go first
        async with s.lock:
            await self._wait_for_dying_subnets(spec.subnet)  # under the lock: no rm slips in
            await self.refresh_routes()
            decided = plan.plan_network(
                spec,
                topo=s.topo,
                pools=s.pools,
                new_id=secrets.token_hex(32),
                random40=secrets.randbits(40),
                now=time.time(),
            )
            net = decided.network
            if s.reaper.pending(f"br:{net.bridge}") is not None:
                raise Busy(f"bridge {net.bridge!r} is being deleted; retry", bridge=net.bridge)
            await self._apply_new(net, decided.ula48)
            if spec.subnet is None:
                s.topo.last_subnet = ipaddress.IPv4Network(net.subnet)
            s.bus.publish("network", "created", net.id, name=net.name, bridge=net.bridge,
                          dns=names.dns_enabled(net))  # fmt: skip
            log.info("network.create.complete", network_id=net.id, name=net.name,
                     subnet=net.subnet)  # fmt: skip
            return net

    async def _wait_for_dying_subnets(self, subnet: str | None) -> None:
        for key, old in list(self._dying_subnets.items()):
            dying = self.s.reaper.pending(key)
            if dying is None:
                del self._dying_subnets[key]
            elif subnet is not None and _overlaps(subnet, old):
                await dying.wait()

    async def _apply_new(self, net: Network, ula48: ipaddress.IPv6Network | None) -> None:
        """Bridge and rules at once, then the store; whatever succeeded is undone on failure."""
        s = self.s
        failed: list[BaseException] = []
        made: list[bool] = []
        synced: list[bool] = []
        bridge = bridge_of(net)

        async def make_bridge() -> None:
            try:
                await s.kernel.ensure_bridge(bridge)
                made.append(True)
                if net.ipv6:
                    await s.kernel.set_ip6_forward()
            except Exception as exc:  # kept, so that the other step is undone, not orphaned
                failed.append(exc)

        async def add_rules() -> None:
            try:
                await s.apply_firewall([*s.topo.networks.values(), net])
                synced.append(True)
            except Exception as exc:
                failed.append(exc)

        async def rules_back() -> None:
            await s.apply_firewall()

        async def bridge_back() -> None:
            await s.kernel.delete_bridge(bridge)

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(make_bridge)
                nursery.start_soon(add_rules)
            if not failed:
                try:
                    with s.store.transaction() as w:
                        w.put_network(net)
                        if ula48 is not None:
                            w.set_meta("ula48", str(ula48))
                        if net.ip_range is None and not net.is_default:
                            w.set_meta("last_subnet", net.subnet)
                except Exception as exc:
                    failed.append(exc)
            if failed:
                steps = ([rules_back] if synced else []) + ([bridge_back] if made else [])
                await undo(failed[0], steps)
                raise failed[0]
        if ula48 is not None:
            s.topo.ula48 = ula48
        s.topo.add_network(net)

    async def propose_subnet(
        self, subnet: str | None = None, *, pending: Iterable[ipaddress.IPv4Network] = ()
    ) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
        """(subnet, gateway) a create with `subnet` (None: a chosen one) would get now, also
        avoiding the `pending` subnets; nothing is reserved. An engine's IPAM asks this
        before it creates the network (Docker's RequestPool)."""
        s = self.s
        await self.refresh_routes()
        more = blocks.BlockSet(blocks.span(n) for n in pending)
        net, gateway, _ = ipam.plan_subnet(
            subnet=subnet, gateway=None, ip_range=None, pools=s.pools,
            used=[*s.topo.subnets(), *pending], avoid=(), after=s.topo.last_subnet,
            taken=blocks.Either(s.topo.used4, s.topo.routes4, more),
        )  # fmt: skip
        return net, gateway

    async def refresh_routes(self) -> None:
        """Bring `topo.routes4` up to date with the host's routes: only the changes since the
        last time cross from the kernel worker (`agent.kernel.routewatch`)."""
        async with self._routes_lock:
            kind, added, removed = await self.s.kernel.route_changes()
            routes = self.s.topo.routes4
            if kind == "full":
                routes = self.s.topo.routes4 = blocks.BlockSet()
            for text in added:
                routes.add(*blocks.span(ipaddress.IPv4Network(text)))
            for text in removed:
                routes.remove(*blocks.span(ipaddress.IPv4Network(text)))

    def filter(self, labels: Iterable[str] = ()) -> list[Network]:
        """Networks with every label filter (`K` or `K=V`), oldest first."""
        nets = [n for n in self.s.topo.networks.values() if plan.labels_match(n, labels)]
        return sorted(nets, key=lambda n: (n.created, n.name))

    def inspect(self, ref: str) -> tuple[Network, list[Endpoint]]:
        """The network named `ref` and its endpoints, by address."""
        net = self.s.topo.find_network(ref)
        eps = self.s.topo.endpoints_of(net.id)
        return net, sorted(eps, key=lambda e: ipaddress.IPv4Address(e.ip))

    async def remove(self, ref: str, *, force: bool = False) -> Network:
        """Remove a network; Busy while it has endpoints, unless `force` disconnects them."""
        async with self.s.lock:
            net = self.s.topo.find_network(ref)
            if net.is_default:
                raise InvalidArgument(
                    f"{net.name!r} is the default network and cannot be removed", network=net.name
                )
            eps = self.s.topo.endpoints_of(net.id)
            if eps and not force:
                raise Busy(
                    f"network {net.name!r} has {len(eps)} active endpoint(s): disconnect them "
                    "or use --force",
                    network=net.name,
                    endpoints=len(eps),
                )
            for ep in eps:
                await self.endpoints.release(ep)
            await self._forget([net])
            return net

    async def prune(self, labels: Iterable[str] = ()) -> list[Network]:
        """Every unused network matching the filter, in one firewall transaction (each
        network's own `rm` would pay nf_tables' ~15 ms deletion wait twice)."""
        async with self.s.lock:
            unused = [
                net
                for net in self.filter(labels)
                if not net.is_default and not self.s.topo.endpoints_of(net.id)
            ]
            if unused:
                await self._forget(unused)
            return unused

    async def _forget(self, nets: list[Network]) -> None:
        """Rules of `nets` (endpoint-free) gone in one transaction, then the store; their
        bridges go to the reaper. The rules are put back if the store fails."""
        s = self.s
        gone = {net.id for net in nets}
        remaining = [n for n in s.topo.networks.values() if n.id not in gone]

        async def rules_back() -> None:
            await s.apply_firewall()

        with trio.CancelScope(shield=True):
            await s.apply_firewall(remaining)
            try:
                with s.store.transaction() as w:
                    for net in nets:
                        w.delete_network(net.id)
            except BaseException as exc:
                await undo(exc, [rules_back])
                raise
        for net in nets:
            s.topo.remove_network(net.id)
            s.reaper.retire_bridge(bridge_of(net))
            self._dying_subnets[f"br:{net.bridge}"] = ipaddress.IPv4Network(net.subnet)
            s.bus.publish("network", "removed", net.id, name=net.name)
            log.info("network.remove.complete", network_id=net.id, name=net.name)


def _overlaps(subnet: str, other: ipaddress.IPv4Network) -> bool:
    """Whether the (not yet validated) `subnet` text overlaps `other`; False if malformed."""
    try:
        return ipaddress.ip_network(subnet.strip(), strict=False).overlaps(other)
    except ValueError:
        return False
