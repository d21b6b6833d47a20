"""Start-up adoption: rebuild the topology from the store and converge the kernel to it.

Theory of operation. The store is the desired state; the kernel may differ after a crash or
while the agent was down:
- a bridge or veth that carries our ownership alias but that the store does not know is a
  leftover of an interrupted request: it is deleted;
- a network whose bridge is missing gets it back (with its gateway address);
- an endpoint whose namespace is gone (or whose path now names another namespace) is released;
  one whose namespace still exists but whose veth is missing is re-attached with the same
  address and MAC, so a container keeps its address across agent restarts.
- an endpoint reserved but not joined (Docker's CreateEndpoint before Join) keeps its
  addresses; it has nothing in the kernel. One joined through an engine that moved the veth's
  peer into its own namespace (Docker: `naming.ENGINE_KEY_PREFIX`) is kept while its host
  veth exists, else released (that namespace is the engine's to re-create).
- a link whose ownership alias has no record in it (`agent.core.marks`: written by an older
  agentd) gets its mark, so that a later rebuild from the kernel finds it (a cheap check: a
  mark is computed only for those);
- after a rebuild from the kernel (`agent.service.rebuild`: the store was lost), links with
  our alias but no record are kept (`keep_unknown`): they may be live.
Firewall convergence happens afterwards, in one transaction (`Firewall.setup`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import msgspec

from agent.core import marks, naming
from agent.core.attach import Bridge, attachment_of, bridge_of, gateway_cidr
from agent.core.errors import AgentError
from agent.core.model import Endpoint
from agent.core.topology import Topology
from agent.kernel.base import Kernel, LinkInfo, Namespaces
from agent.log import get_logger
from agent.store.sqlite import State, Store

log = get_logger("agent.service.adopt")


@dataclass
class AdoptReport:
    """What adoption changed, for the log and for tests."""

    leftovers_deleted: list[str] = field(default_factory=list)
    bridges_restored: list[str] = field(default_factory=list)
    endpoints_released: list[str] = field(default_factory=list)
    endpoints_reattached: list[str] = field(default_factory=list)
    sandboxes_forgotten: list[str] = field(default_factory=list)
    unknown_kept: list[str] = field(default_factory=list)  # ours, no record, kept (rebuild)
    marks_refreshed: list[str] = field(default_factory=list)


async def adopt(
    *,
    state: State,
    topo: Topology,
    kernel: Kernel,
    owned_links: list[LinkInfo],
    ns: Namespaces,
    store: Store,
    keep_unknown: bool = False,
) -> AdoptReport:
    """Fill `topo` from `state` and repair the kernel's links to match it. With
    `keep_unknown` (after a rebuild from the kernel), links with our alias that `state` does
    not know are kept, not deleted: only their records are missing."""
    report = AdoptReport()
    for net in state.networks:
        topo.add_network(net)
    if last := state.meta.get("last_subnet"):
        topo.last_subnet = ipaddress.IPv4Network(last)
    if ula := state.meta.get("ula48"):
        topo.ula48 = ipaddress.IPv6Network(ula)
    if any(net.ipv6 for net in state.networks):
        await kernel.set_ip6_forward()

    present: dict[str, LinkInfo] = {}  # endpoint id -> its host link seen in the kernel
    stored = {e.id for e in state.endpoints}
    for link in owned_links:
        owner = naming.parse_alias(link.alias)
        if owner is None:  # our link group but no alias yet: a create interrupted by a crash
            if link.kind == "bridge":
                await kernel.delete_bridge(Bridge(link.name))
            else:
                await kernel.detach(link.name)
            report.leftovers_deleted.append(link.name)
            continue
        kind, ident = owner
        if keep_unknown and ident not in (topo.networks if kind == "net" else stored):
            report.unknown_kept.append(link.name)
        elif kind == "net" and ident not in topo.networks:
            await kernel.delete_bridge(Bridge(link.name))
            report.leftovers_deleted.append(link.name)
        elif kind == "ep" and ident not in stored:
            await kernel.detach(link.name)
            report.leftovers_deleted.append(link.name)
        elif kind == "ep":
            present[ident] = link

    bridges: dict[str, int] = {}  # network id -> bridge ifindex
    by_name = {link.name: link for link in owned_links}
    for net in topo.networks.values():
        found = by_name.get(net.bridge)
        if (
            found is not None
            and found.kind == "bridge"
            and gateway_cidr(net) in found.addresses
            and not net.ipv6
        ):  # intact (the dump says so): no netlink round trip per network at start-up
            bridges[net.id] = found.index
            if not marks.has_payload(found.alias):  # a mark from an older agentd
                await _refresh_mark(kernel, net.bridge, marks.network_mark(net), report)
            continue
        bridges[net.id] = await kernel.ensure_bridge(bridge_of(net))
        if found is None:
            report.bridges_restored.append(net.bridge)

    for ep in state.endpoints:
        if ep.network_id not in topo.networks:
            _forget_endpoint(store, ep)
            continue
        if not ep.joined:  # reserved: its addresses only
            _reserve(topo, ep)
            continue
        if ep.netns_key.startswith(naming.ENGINE_KEY_PREFIX):
            # an engine moved the peer into a namespace it made (Docker): its veth is the
            # connection; gone (the container's namespace went with its peer) -> released
            if ep.id not in present:
                _forget_endpoint(store, ep)
                report.endpoints_released.append(ep.id)
                continue
        elif not _same_namespace(ns, ep):
            if ep.id in present:
                await kernel.detach(ep.host_ifname)
            _forget_endpoint(store, ep)
            report.endpoints_released.append(ep.id)
            continue
        if ep.id not in present:
            reattached = await _reattach(kernel, topo, ep, store, report)
            if reattached is None:
                _forget_endpoint(store, ep)
                report.endpoints_released.append(ep.id)
                continue
            ep = reattached
            report.endpoints_reattached.append(ep.id)
        else:
            if present[ep.id].master != bridges[ep.network_id] or not present[ep.id].up:
                # its bridge was deleted (ports are released) and recreated, or it was set down
                await kernel.enslave(ep.host_ifname, topo.networks[ep.network_id].bridge)
            if not marks.has_payload(present[ep.id].alias):  # an older agentd's mark
                await _refresh_mark(kernel, ep.host_ifname, marks.endpoint_mark(ep), report)
        _reserve(topo, ep)

    for net_id, alloc in topo.allocators.items():
        if cursor := state.meta.get(f"cursor:{net_id}"):
            alloc.set_cursor(int(cursor))
    for net_id, alloc6 in topo.allocators6.items():
        if cursor := state.meta.get(f"cursor6:{net_id}"):
            alloc6.set_cursor(int(cursor))

    for sb in state.sandboxes:
        if _key_or_none(ns, sb.path) == sb.netns_key:
            topo.sandboxes[sb.name] = sb
        else:
            with store.transaction() as w:
                w.delete_sandbox(sb.name)
            report.sandboxes_forgotten.append(sb.name)
    log.info(
        "adopt.complete",
        networks=len(topo.networks),
        endpoints=len(topo.endpoints),
        leftovers=len(report.leftovers_deleted),
        released=len(report.endpoints_released),
        reattached=len(report.endpoints_reattached),
        unknown_kept=report.unknown_kept,
        marks_refreshed=len(report.marks_refreshed),
    )
    return report


async def _refresh_mark(kernel: Kernel, name: str, mark: str, report: AdoptReport) -> None:
    """Rewrite a link's mark; a failure only costs a later rebuild that link's details."""
    try:
        await kernel.set_alias(name, mark)
    except AgentError as exc:
        log.warning("adopt.mark.failed", link=name, error=str(exc))
        return
    report.marks_refreshed.append(name)


def _reserve(topo: Topology, ep: Endpoint) -> None:
    """Take the endpoint's addresses again and put it in the topology."""
    topo.reserve_addresses(ep)
    topo.add_endpoint(ep)


def _key_or_none(ns: Namespaces, path: str) -> str | None:
    try:
        return ns.netns_key(path)
    except AgentError:
        return None


def _same_namespace(ns: Namespaces, ep: Endpoint) -> bool:
    return _key_or_none(ns, ep.netns) == ep.netns_key


def _forget_endpoint(store: Store, ep: Endpoint) -> None:
    with store.transaction() as w:
        w.delete_endpoint(ep.id)


async def _reattach(
    kernel: Kernel, topo: Topology, ep: Endpoint, store: Store, report: AdoptReport
) -> Endpoint | None:
    """The endpoint re-attached with its addresses and MAC, or None if that failed. If its
    namespace has disabled IPv6 since, it keeps IPv4 only, on record too (so that no IPv6
    rule names an address that is not configured)."""
    try:
        ipv6 = await kernel.attach(attachment_of(topo.networks[ep.network_id], ep))
    except AgentError as exc:
        log.warning("adopt.reattach.failed", endpoint_id=ep.id, error=str(exc))
        return None
    if not ipv6 and ep.ip6 is not None:
        log.warning("adopt.reattach.ipv6_disabled", endpoint_id=ep.id, ip6=ep.ip6)
        ep = msgspec.structs.replace(ep, ip6=None)
        with store.transaction() as w:
            w.put_endpoint(ep)
        await _refresh_mark(kernel, ep.host_ifname, marks.endpoint_mark(ep), report)
    return ep
