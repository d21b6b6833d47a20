"""Published ports of existing endpoints (`port.publish|unpublish`); `-p` on connect is
decided with the endpoint (`plan.reserve_endpoint`).

The port rules live in each network's own chains, so publishing rewrites only that network's
part of the ruleset; the whole request takes the topology lock exclusively, since a mapping is
checked against every other one. All or nothing: rules, then the veth's ownership mark (which
carries the ports for a rebuild from the kernel), then the store; each put back if a later
step fails.
"""

from __future__ import annotations

import msgspec
import trio

from agent.core import marks, plan, ports
from agent.core.errors import InvalidArgument, NotFound
from agent.core.model import Endpoint, PortMapping
from agent.log import get_logger
from agent.service.context import Shared, undo

log = get_logger("agent.service.ports")


class Ports:
    """Port mapping requests; see `agent.core.ports` for the spec syntax and checks."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared

    def _endpoint_of(self, netns: str, network: str | None) -> Endpoint:
        topo = self.s.topo
        key = self.s.ns.netns_key(self.s.ns.resolve(netns))
        eps = topo.endpoints_in(key)
        if network is not None:
            net_id = topo.find_network(network).id
            eps = [e for e in eps if e.network_id == net_id]
        if len(eps) == 1:
            return eps[0]
        if not eps:
            raise NotFound(f"namespace {netns!r} has no endpoint here", netns=netns)
        raise InvalidArgument(
            f"namespace {netns!r} is on {len(eps)} networks: name one with --network",
            netns=netns,
        )

    async def publish(
        self, netns: str, mappings: list[PortMapping], *, network: str | None = None
    ) -> Endpoint:
        """Add published ports to the namespace's endpoint (on `network`); all or none."""
        async with self.s.lock:
            return await self._publish(self._endpoint_of(netns, network), mappings)

    async def publish_endpoint(self, ref: str, mappings: list[PortMapping]) -> Endpoint:
        """`publish` on the joined endpoint `ref` (id or attachment key), for an engine that
        knows its endpoint but not its namespace (Docker's ProgramExternalConnectivity)."""
        async with self.s.lock:
            ep = self.s.topo.find_endpoint(ref)
            if not ep.joined:
                raise InvalidArgument(f"endpoint {ep.id[:12]} has not joined", endpoint=ep.id)
            return await self._publish(ep, mappings)

    async def unpublish_endpoint(self, ref: str) -> Endpoint:
        """Every port of the endpoint `ref` unpublished (Docker's RevokeExternalConnectivity)."""
        async with self.s.lock:
            return await self._replace(self.s.topo.find_endpoint(ref), ())

    async def _publish(self, ep: Endpoint, mappings: list[PortMapping]) -> Endpoint:
        net = self.s.topo.networks[ep.network_id]
        taken = (m for e in self.s.topo.with_ports() for m in e.ports)
        return await self._replace(ep, plan.check_ports(net, mappings, taken, ep.ports))

    async def unpublish(
        self, netns: str, mappings: list[PortMapping], *, network: str | None = None
    ) -> Endpoint:
        """Remove published ports (each must be published by this endpoint) and their flows."""
        async with self.s.lock:
            ep = self._endpoint_of(netns, network)
            gone = set(mappings)
            for m in sorted(gone - set(ep.ports)):
                raise NotFound(
                    f"port {ports.format_spec(m)} is not published by this endpoint",
                    port=ports.format_spec(m),
                )
            return await self._replace(ep, tuple(m for m in ep.ports if m not in gone))

    async def _replace(self, ep: Endpoint, new: tuple[PortMapping, ...]) -> Endpoint:
        s = self.s
        updated = msgspec.structs.replace(ep, ports=new)
        others = [e for e in s.topo.with_ports() if e.id != ep.id]

        async def rules_back() -> None:
            await s.apply_firewall(endpoints=[*others, ep])

        async def mark_back() -> None:
            await s.kernel.set_alias(ep.host_ifname, marks.endpoint_mark(ep))

        with trio.CancelScope(shield=True):
            await s.apply_firewall(endpoints=[*others, updated])
            done = [rules_back]
            try:
                if ep.joined:  # the veth's mark carries the ports, for a rebuild
                    await s.kernel.set_alias(ep.host_ifname, marks.endpoint_mark(updated))
                    done.insert(0, mark_back)
                with s.store.transaction() as w:
                    w.put_endpoint(updated)
            except BaseException as exc:
                await undo(exc, done)
                raise
        s.topo.add_endpoint(updated)
        log.info("endpoint.ports.complete", endpoint_id=ep.id, ports=len(new))
        return updated
