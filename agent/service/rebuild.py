"""Start-up without a usable store: the desired state rebuilt from the kernel's ownership marks.

Theory of operation. Every bridge and veth agentd makes carries its network's or endpoint's
record in its alias (`agent.core.marks`). When agentd starts with a store that is new (deleted
while agentd was down), was found corrupt (kept aside by `open_store`), or holds no network at
all (a store that served always holds the default one), and the kernel holds links with our
marks, the records are read back from those marks instead of the links being deleted as
leftovers: networks from bridges, endpoints from host veth ends (their network by the id
prefix in the mark, else by the bridge they are enslaved to), agent-made sandboxes from
their endpoints. The result is written to the store in one transaction and adoption then runs
as on any restart (namespaces that vanished are released, missing bridges restored, rules
converged by the firewall's setup). Links that carry our alias but no readable mark (written
before marks had a payload) are kept untouched and reported, never deleted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.core import marks
from agent.core.model import Endpoint, Network, Sandbox
from agent.kernel.base import LinkInfo
from agent.log import get_logger
from agent.store.sqlite import State, Store

log = get_logger("agent.service.rebuild")


@dataclass
class RebuildReport:
    """What the rebuild found, for the log and for tests."""

    networks: list[str] = field(default_factory=list)  # names
    endpoints: list[str] = field(default_factory=list)  # ids
    sandboxes: list[str] = field(default_factory=list)  # names
    incomplete: list[str] = field(default_factory=list)  # ids whose mark lost something
    unreadable: list[str] = field(default_factory=list)  # link names kept without a record


def needed(opened: str, state: State, owned: list[LinkInfo]) -> bool:
    """Whether the store is unusable (new, corrupt, or without any network) while the kernel
    holds links that carry our ownership alias."""
    if opened == "existing" and state.networks:
        return False
    return any(marks.decode(link.alias) is not None for link in owned)


def state_from_links(owned: list[LinkInfo]) -> tuple[State, RebuildReport]:
    """The desired state the marks of `owned` describe."""
    report = RebuildReport()
    nets: dict[str, Network] = {}
    by_index: dict[int, Network] = {}
    veths: list[tuple[LinkInfo, str, marks.EpMark]] = []
    for link in owned:
        decoded = marks.decode(link.alias)
        if decoded is None:
            continue
        _, ident, mark = decoded
        if isinstance(mark, marks.NetMark):
            net = marks.network_of(ident, link.name, mark)
            nets[ident] = by_index[link.index] = net
            report.networks.append(net.name)
            if mark.flags & marks.INCOMPLETE:
                report.incomplete.append(ident)
        elif isinstance(mark, marks.EpMark):
            veths.append((link, ident, mark))
        else:
            report.unreadable.append(link.name)

    eps: list[Endpoint] = []
    for link, ident, mark in veths:
        prefix = mark.network.hex()
        owner = next((n for n in nets.values() if n.id.startswith(prefix)), None)
        owner = owner or by_index.get(link.master)
        if owner is None:
            report.unreadable.append(link.name)
            continue
        eps.append(marks.endpoint_of(ident, owner.id, link.name, mark))
        report.endpoints.append(ident)
        if mark.flags & marks.EP_INCOMPLETE:
            report.incomplete.append(ident)

    sandboxes = {
        ep.sandbox: Sandbox(name=ep.sandbox, path=ep.netns, netns_key=ep.netns_key)
        for ep in eps
        if ep.sandbox is not None
    }
    report.sandboxes = sorted(sandboxes)
    meta: dict[str, str] = {}
    chosen = [n for n in nets.values() if n.ip_range is None and not n.is_default]
    if chosen:  # where the next automatic subnet choice continues (a cursor: any is safe)
        last = max(chosen, key=lambda n: (n.created, ipaddress.ip_network(n.subnet)))
        meta["last_subnet"] = last.subnet
    state = State(
        networks=list(nets.values()), endpoints=eps, sandboxes=list(sandboxes.values()), meta=meta
    )
    return state, report


def rebuild(store: Store, owned: list[LinkInfo]) -> tuple[State, RebuildReport]:
    """Rebuild the state from `owned`'s marks, write it to `store` (one transaction), log it.

    Error handling:
        StorageError if it cannot be written (agentd then does not start: nothing was changed).
    """
    state, report = state_from_links(owned)
    with store.transaction() as w:
        for net in state.networks:
            w.put_network(net)
        for ep in state.endpoints:
            w.put_endpoint(ep)
        for sb in state.sandboxes:
            w.put_sandbox(sb)
        for key, value in state.meta.items():
            w.set_meta(key, value)
    log.warning(
        "store.rebuilt_from_kernel",
        store=store.opened,
        networks=report.networks,
        endpoints=len(report.endpoints),
        sandboxes=report.sandboxes,
        incomplete=report.incomplete,
        unreadable_kept=report.unreadable,
        subnets=[str(ipaddress.ip_network(n.subnet)) for n in state.networks],
    )
    return state, report
