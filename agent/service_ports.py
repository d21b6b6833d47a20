"""Published ports of the service (`port.publish|unpublish`, `-p` on connect/run).

A mixin of `agent.service.Service`: same lock, same all-or-nothing rule. The port rules live
in each network's own chains, so publishing rewrites only that network's chains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
import trio

from agent.api import protocol as p
from agent.core import policy, ports
from agent.core.errors import InvalidArgument, NotFound
from agent.core.model import Endpoint, Network, PortMapping
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.service import Service

log = get_logger("agent.service")


class PortsMixin:
    """Port mapping requests; see `agent.core.ports` for the spec syntax and checks."""

    def _new_ports(
        self: Service, net: Network, specs: list[str], current: tuple[PortMapping, ...]
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
        taken = [m for e in self.topo.with_ports() for m in e.ports]
        ports.check_free(wanted, taken)
        return tuple(sorted((*current, *wanted)))

    async def _sync_ports(self: Service, endpoints: Iterable[Endpoint]) -> None:
        """Apply the rules of `endpoints` (those that publish ports matter)."""
        await self.firewall.apply(policy.build(self.topo.networks.values(), endpoints))

    def _endpoint_of(self: Service, req: p.PortChange) -> Endpoint:
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

    async def publish(self: Service, req: p.PortChange) -> Endpoint:
        """Add published ports to an endpoint (all of them or none)."""
        async with self.lock:
            ep = self._endpoint_of(req)
            net = self.topo.networks[ep.network_id]
            return await self._replace_ports(ep, self._new_ports(net, req.ports, ep.ports))

    async def unpublish(self: Service, req: p.PortChange) -> Endpoint:
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

    async def _replace_ports(self: Service, ep: Endpoint, new: tuple[PortMapping, ...]) -> Endpoint:
        updated = msgspec.structs.replace(ep, ports=new)
        others = [e for e in self.topo.with_ports() if e.id != ep.id]
        with trio.CancelScope(shield=True):
            await self._sync_ports([*others, updated])
            try:
                with self.store.transaction() as w:
                    w.put_endpoint(updated)
            except BaseException:
                await self._sync_ports([*others, ep])
                raise
        self.topo.add_endpoint(updated)
        log.info("endpoint.ports.complete", endpoint_id=ep.id, ports=len(new))
        return updated
