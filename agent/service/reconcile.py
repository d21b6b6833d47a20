"""Self-healing: react to kernel events and firewall drift, live.

Theory of operation. Two event streams feed this module:
- rtnetlink (`agent.kernel.events`): links and addresses of the host namespace. A container
  namespace that is deleted takes its veth end with it, and the kernel then deletes the host
  end too: its RTM_DELLINK is how a vanished namespace is noticed (no polling).
- nftables notifications (`agent.firewall.monitor`): every iptables change here (nft backend)
  ends with a NEWGEN message naming the process. The firewall backend tells which ones may
  have changed its rules and are not its own (`Firewall.foreign`); each of those triggers one
  drift check (`Firewall.repair`), after a short debounce so that a burst of foreign commands
  costs one check.

Every reaction takes the service's topology lock exclusively and re-checks under it: an event
caused by the agent's own request (a disconnect deletes a veth) finds nothing left to do.
Reactions are idempotent; on a lost event (`Overflow`) a full resync compares a dump of the
agent's links with the topology.
"""

from __future__ import annotations

from typing import Any

import trio

from agent.core import naming
from agent.core.attach import bridge_of, gateway_cidr
from agent.core.errors import AgentError
from agent.core.model import Endpoint
from agent.firewall.base import Firewall
from agent.kernel.base import LinkInfo
from agent.log import get_logger
from agent.service import Service

log = get_logger("agent.service.reconcile")

DEBOUNCE = 0.05  # seconds: a burst of foreign iptables commands costs one drift check
REPAIR_RETRY = 1.0  # seconds before a failed firewall repair is tried again


class Reconciler:
    """Repairs what others changed in the agent's links, addresses and rules."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.topo = svc.shared.topo
        self.kernel = svc.shared.kernel
        self.firewall: Firewall = svc.shared.firewall
        self.lock = svc.shared.lock
        self._firewall_dirty = trio.Event()

    # -- links ------------------------------------------------------------------------------

    async def serve_link_events(
        self, receive: trio.MemoryReceiveChannel[Any], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """Consume rtnetlink events until cancelled; a failed repair is logged, never fatal."""
        task_status.started()
        async for event in receive:
            try:
                await self.on_event(event)
            except AgentError as exc:
                log.warning("repair.failed", error=exc.message, kind=exc.kind)

    async def on_event(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "Overflow":
            log.warning("events.overflow.resync")
            await self.resync_links()
        elif kind == "LinkEvent":
            await self._on_link(event)
        elif kind == "AddrEvent":
            await self._on_addr(event)

    async def release_vanished(self, host_ifname: str) -> Endpoint | None:
        """Release the endpoint whose veth is gone, and forget its sandbox if that namespace
        is gone too; None when it is not (or no longer) an endpoint of ours."""
        async with self.lock:
            return await self._release_vanished(host_ifname)

    async def _release_vanished(self, host_ifname: str) -> Endpoint | None:
        ep = await self.svc.endpoints.release_vanished(host_ifname)
        if ep is not None and ep.sandbox:
            await self.svc.sandboxes.forget_if_gone(ep.sandbox)
        return ep

    async def _on_link(self, ev: Any) -> None:
        if ev.group == naming.DYING_GROUP:  # retired by the agent itself, deleted by its reaper
            return
        topo = self.topo
        if ev.action == "del":
            if topo.endpoint_of_veth(ev.name) is not None:
                ep = await self.release_vanished(ev.name)
                if ep is not None:
                    log.info("repair.endpoint.released", endpoint_id=ep.id, ip=ep.ip)
            elif (net := topo.network_of_bridge(ev.name)) is not None:
                await self.repair_network(net.id, why="bridge deleted")
            return
        if ev.up:
            return
        # A "down" event may be stale (a new bridge is down until its first endpoint joins):
        # act only if the link is down now, checked under the lock.
        if (net := topo.network_of_bridge(ev.name)) is not None:
            async with self.lock:
                state = await self.kernel.link_state(net.bridge)
                if state is not None and not state[0] and topo.endpoints_of(net.id):
                    await self._repair_network(net.id, why="bridge was set down")
        elif (ep := topo.endpoint_of_veth(ev.name)) is not None:
            if not ev.alias:  # being attached: born down, its alias set (silently) just before up
                return
            async with self.lock:
                state = await self.kernel.link_state(ep.host_ifname)
                if ep.id in topo.endpoints and state is not None and not state[0]:
                    net = topo.networks[ep.network_id]
                    await self.kernel.enslave(ep.host_ifname, net.bridge)
                    self._repaired("endpoint", ep.id, f"veth {ep.host_ifname} was set down")

    async def _on_addr(self, ev: Any) -> None:
        if ev.action != "del" or ev.family not in (2, 10):
            return
        net = self.topo.network_of_gateway(ev.address)  # not a walk: rm deletes addresses
        if net is not None:
            await self.repair_network(net.id, why=f"gateway {ev.address} removed")

    async def repair_network(self, network_id: str, *, why: str) -> list[str]:
        """Bridge back (address, up if it has endpoints), its endpoints' veths re-enslaved."""
        async with self.lock:
            return await self._repair_network(network_id, why=why)

    async def _repair_network(self, network_id: str, *, why: str) -> list[str]:
        net = self.topo.networks.get(network_id)
        if net is None:
            return []
        kernel = self.kernel
        eps = [e for e in self.topo.endpoints_of(net.id) if e.joined]
        with trio.CancelScope(shield=True):
            await kernel.ensure_bridge(bridge_of(net))
            self.firewall.bridge_recreated(net.bridge)
            for ep in eps:  # deleting a bridge releases its ports; enslaving also sets it up
                try:
                    await kernel.enslave(ep.host_ifname, net.bridge)
                except AgentError as exc:  # its veth is gone too: its DELLINK releases it
                    log.warning("repair.enslave.failed", endpoint_id=ep.id, error=exc.message)
        return [self._repaired("network", net.id, f"bridge {net.bridge}: {why}")]

    async def resync_links(self) -> list[str]:
        """Compare a dump of the agent's links with the topology and repair every difference.

        The dump and the decisions happen under the exclusive lock, so no request can add an
        endpoint between the dump and its check.
        """
        async with self.lock:
            topo = self.topo
            links = {link.name: link for link in await self.kernel.owned_links()}
            repaired: list[str] = []
            for ep in list(topo.endpoints.values()):
                if ep.joined and ep.host_ifname not in links:
                    await self._release_vanished(ep.host_ifname)
                    repaired.append(f"endpoint {ep.id[:12]} released ({ep.ip}): veth gone")
            for net in list(topo.networks.values()):
                bridge = links.get(net.bridge)
                eps = [e for e in topo.endpoints_of(net.id) if e.joined]
                gateway = gateway_cidr(net)
                gateway6 = gateway_cidr(net, 6)
                if (
                    bridge is None
                    or gateway not in bridge.addresses
                    or (gateway6 is not None and gateway6 not in bridge.addresses)
                    or (eps and not bridge.up)
                    or any(not _is_port(links.get(e.host_ifname), bridge) for e in eps)
                ):
                    repaired += await self._repair_network(net.id, why="resync")
            return repaired

    # -- firewall -------------------------------------------------------------------------

    async def serve_firewall_events(
        self, receive: trio.MemoryReceiveChannel[Any], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """Consume nftables change notifications; mark the firewall dirty on foreign changes."""
        task_status.started()
        async for change in receive:
            if type(change).__name__ == "Overflow":
                self._firewall_dirty.set()
            elif self.firewall.foreign(change):
                log.info("firewall.drift.suspected", pid=change.pid, comm=change.comm)
                self._firewall_dirty.set()

    async def serve_firewall_repair(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one drift check per burst of foreign changes, until cancelled."""
        task_status.started()
        while True:
            await self._firewall_dirty.wait()
            await trio.sleep(DEBOUNCE)
            self._firewall_dirty = trio.Event()
            try:
                await self.repair_firewall()
            except (AgentError, OSError) as exc:  # e.g. no descriptor left: try again later
                message = exc.message if isinstance(exc, AgentError) else str(exc)
                log.error("repair.firewall.failed", error=message, retry_s=REPAIR_RETRY)
                await trio.sleep(REPAIR_RETRY)
                self._firewall_dirty.set()

    async def repair_firewall(self) -> list[str]:
        async with self.lock:
            with trio.CancelScope(shield=True):
                problems = await self.firewall.repair(self.svc.shared.policy())
        return [self._repaired("firewall", self.firewall.name, p) for p in problems]

    async def reconcile(self) -> list[str]:
        """Everything at once (`agentctl reconcile`): links, then rules."""
        return [*await self.resync_links(), *await self.repair_firewall()]

    def _repaired(self, what: str, ident: str, detail: str) -> str:
        log.info("repair.complete", object=what, id=ident, detail=detail)
        self.svc.shared.bus.publish("repair", "repaired", ident, object=what, detail=detail)
        return detail


def _is_port(link: LinkInfo | None, bridge: LinkInfo) -> bool:
    return link is not None and link.master == bridge.index and link.up
