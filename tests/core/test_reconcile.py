"""Live repairs with fakes: what each kernel event or firewall change leads the reconciler
to do, through the service's public methods only."""

from __future__ import annotations

import trio

from agent.core import naming
from agent.core.nlevents import AddrEvent, LinkEvent, Overflow
from agent.core.plan import EndpointSpec, NetworkSpec
from agent.firewall.monitor import NftChange
from agent.kernel.base import LinkInfo
from agent.service.reconcile import Reconciler


def _link(action: str, name: str, *, up: bool = False, alias: str | None = None) -> LinkEvent:
    return LinkEvent(action, 9, name, "veth", alias, 0, up, naming.LINK_GROUP)


async def test_a_vanished_namespace_releases_its_endpoint_and_sandbox(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.sandboxes.run("ok-sb", EndpointSpec(network="a"))
    events = []
    reconciler = Reconciler(svc)
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            async for event in svc.bus.subscribe([]):
                events.append((event.type, event.action))

        nursery.start_soon(watch)
        await trio.sleep(0)
        svc.shared.ns.gone.add(ep.netns)  # the namespace was deleted: its veth goes with it
        await reconciler.on_event(_link("del", ep.host_ifname))
        await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert svc.topo.endpoints == {} and svc.topo.sandboxes == {}
    assert svc.shared.store.load().endpoints == [] and svc.shared.store.load().sandboxes == []
    assert ("endpoint", "released") in events
    await svc.reaper.wait_idle()
    again = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok2", ip=ep.ip))
    assert again.ip == ep.ip  # the address went back to the pool


async def test_a_deleted_bridge_is_recreated_with_its_ports(svc) -> None:
    net = await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    kernel = svc.shared.kernel
    del kernel.bridges[net.bridge]
    reconciler = Reconciler(svc)
    await reconciler.on_event(LinkEvent("del", 3, net.bridge, "bridge", None, 0, False, 0))
    assert kernel.bridges[net.bridge] == "10.1.0.1/24" and kernel.enslaved == [ep.host_ifname]
    kernel.enslaved.clear()
    await reconciler.on_event(AddrEvent("del", 3, 2, "10.1.0.1", 24))  # the gateway went
    assert kernel.enslaved == [ep.host_ifname]
    await reconciler.on_event(AddrEvent("del", 3, 2, "10.9.9.9", 24))  # not ours: nothing
    assert kernel.enslaved == [ep.host_ifname]


async def test_resync_compares_a_dump_with_the_topology(svc) -> None:
    net = await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    kept = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    lost = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok2"))
    await svc.endpoints.reserve(EndpointSpec(network="a"))  # no veth: not "lost"
    svc.shared.kernel.links = [
        LinkInfo(1, net.bridge, "bridge", "", 0, True, ("10.1.0.1/24",)),
        LinkInfo(2, kept.host_ifname, "veth", "", 1, True, ()),
    ]
    repaired = await Reconciler(svc).on_event(Overflow("link", "kernel")) or []
    assert repaired == [] and lost.id not in svc.topo.endpoints
    assert kept.id in svc.topo.endpoints and len(svc.topo.endpoints) == 2


async def test_only_foreign_firewall_changes_trigger_a_repair(svc, monkeypatch) -> None:
    reconciler = Reconciler(svc)
    repairs: list[object] = []

    async def repair(policy):
        repairs.append(policy)
        return ["jump FORWARD -> NETAGENT-FORWARD restored"]

    monkeypatch.setattr(svc.shared.firewall, "repair", repair)
    monkeypatch.setattr(svc.shared.firewall, "foreign", lambda change: change.pid == 2)
    ours, theirs = NftChange(1, 1, "ours", frozenset()), NftChange(2, 2, "theirs", frozenset())
    send, receive = trio.open_memory_channel[object](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(reconciler.serve_firewall_events, receive)
        await nursery.start(reconciler.serve_firewall_repair)
        send.send_nowait(ours)
        await trio.sleep(0.2)
        assert repairs == []
        send.send_nowait(theirs)
        send.send_nowait(theirs)  # a burst: one check
        await trio.sleep(0.2)
        assert len(repairs) == 1
        nursery.cancel_scope.cancel()


async def test_a_failed_firewall_repair_is_tried_again_and_never_stops_the_loop(
    svc, monkeypatch
) -> None:
    """A repair that fails (here: no descriptor left, as under a low nofile) is logged and
    tried again later; it must not take agentd down."""
    from agent.service import reconcile

    monkeypatch.setattr(reconcile, "REPAIR_RETRY", 0.05)
    reconciler = Reconciler(svc)
    calls: list[int] = []

    async def repair(policy):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return ["table restored"]

    monkeypatch.setattr(svc.shared.firewall, "repair", repair)
    monkeypatch.setattr(svc.shared.firewall, "foreign", lambda change: True)
    send, receive = trio.open_memory_channel[object](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(reconciler.serve_firewall_events, receive)
        await nursery.start(reconciler.serve_firewall_repair)
        send.send_nowait(NftChange(2, 2, "theirs", frozenset()))
        with trio.fail_after(5):
            while len(calls) < 2:
                await trio.sleep(0.01)
        assert len(calls) == 2  # the failed repair was tried again, by the same loop
        nursery.cancel_scope.cancel()


async def test_a_gateway_is_found_by_either_family_and_forgotten_with_its_network(svc) -> None:
    """The address index behind `_on_addr` (no walk over every network on each deletion)."""
    await svc.networks.create(
        NetworkSpec(name="a", subnet="10.1.0.0/24", ipv6=True, subnet6="fd00:1::/64")
    )
    await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    gone = await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
    await svc.networks.remove("b")
    kernel = svc.shared.kernel
    reconciler = Reconciler(svc)
    await reconciler.on_event(AddrEvent("del", 3, 2, gone.gateway, 24))  # removed: nothing
    assert kernel.enslaved == [] and svc.topo.network_of_gateway(gone.gateway) is None
    await reconciler.on_event(AddrEvent("del", 3, 10, "fd00:1::1", 64))
    assert len(kernel.enslaved) == 1
