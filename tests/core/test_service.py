"""Service logic with fakes of the shells (not mocks): all-or-nothing requests, rollbacks.

The real kernel and iptables are exercised by tests/shell and tests/e2e; here the fakes let us
fail each step on purpose and check that nothing was half-applied.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio

from agent.core.errors import (
    AgentError,
    Busy,
    Conflict,
    FirewallApply,
    InvalidArgument,
    KernelError,
    NotFound,
    PoolExhausted,
)
from agent.core.plan import EndpointSpec, NetworkSpec
from agent.service import Service


def bridges(svc: Service, *names: str) -> list[str]:
    """The bridges of the networks `names`, sorted (what the fake firewall reports)."""
    return sorted(svc.topo.find_network(n).bridge for n in names)


async def test_create_picks_docker_pools_in_order_and_skips_routes(svc) -> None:
    await svc.networks.create(NetworkSpec(name="bridge", is_default=True))
    svc.shared.kernel.routes = [ipaddress.IPv4Network("172.18.5.0/24")]
    net = await svc.networks.create(NetworkSpec(name="a"))
    assert (net.subnet, net.gateway, net.bridge) == (
        "172.19.0.0/16",
        "172.19.0.1",
        f"br-{net.id[:12]}",
    )
    assert svc.shared.kernel.bridges[net.bridge] == "172.19.0.1/16"
    assert svc.shared.store.load().networks[-1].name in {"a", "bridge"}


async def test_firewall_failure_leaves_no_bridge_and_no_record(svc) -> None:
    svc.shared.firewall.fail = True
    with pytest.raises(FirewallApply):
        await svc.networks.create(NetworkSpec(name="a"))
    assert svc.shared.kernel.bridges == {}
    assert svc.topo.networks == {}
    assert svc.shared.store.load().networks == []


async def test_bridge_failure_takes_the_new_rules_back(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    svc.shared.kernel.fail_bridge = True  # the rules are applied meanwhile, then must go again
    with pytest.raises(Conflict):
        await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
    assert svc.shared.firewall.networks == bridges(svc, "a")
    assert [n.name for n in svc.topo.networks.values()] == ["a"]
    assert [n.name for n in svc.shared.store.load().networks] == ["a"]


async def test_kernel_failure_on_connect_releases_the_address(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    svc.shared.kernel.fail_attach = True
    with pytest.raises(KernelError):
        await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    svc.shared.kernel.fail_attach = False
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ip="10.1.0.2"))
    assert ep.ip == "10.1.0.2"  # it was released, so the static request succeeds
    assert svc.shared.store.load().endpoints == [ep]


async def test_connect_twice_conflicts_and_remove_with_endpoints_is_busy(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    with pytest.raises(Conflict):
        await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    with pytest.raises(Busy):
        await svc.networks.remove("a")
    assert len(svc.shared.kernel.veths) == 1
    await svc.networks.remove("a", force=True)
    await svc.reaper.wait_idle()  # the veth is deleted by the next batch
    assert svc.shared.kernel.veths == {} and svc.shared.kernel.bridges == {}
    assert svc.shared.store.load().networks == [] and svc.shared.store.load().endpoints == []


async def test_run_failure_deletes_the_namespace_it_created(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    svc.shared.kernel.fail_attach = True
    with pytest.raises(KernelError):
        await svc.sandboxes.run("ok-sb", EndpointSpec(network="a"))
    assert svc.shared.ns.named == set()
    assert svc.shared.store.load().sandboxes == []
    with pytest.raises(NotFound):
        await svc.sandboxes.run("ok-sb", EndpointSpec(network="missing"))
    assert svc.shared.ns.named == set()


async def test_second_namespace_interface_is_eth1(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
    e0 = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    e1 = await svc.endpoints.connect(EndpointSpec(network="b", netns="ok1"))
    assert (e0.ifname, e1.ifname) == ("eth0", "eth1")
    assert e0.mac == "02:42:0a:01:00:02"


async def test_aux_addresses_are_never_handed_out(svc) -> None:
    aux = {"router": "10.1.0.2", "printer": "10.1.0.4"}
    net = await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24",
                                                   aux_addresses=aux))  # fmt: skip
    assert net.aux_addresses == aux
    ips = [(await svc.endpoints.connect(EndpointSpec(network="a", netns=f"ok{i}"))).ip
           for i in range(2)]  # fmt: skip
    assert ips == ["10.1.0.3", "10.1.0.5"]
    with pytest.raises(AgentError):
        await svc.endpoints.connect(EndpointSpec(network="a", netns="ok9", ip="10.1.0.2"))
    for bad in ({"x": "10.2.0.1"}, {"x": "10.1.0.1"}, {"x": "nope"}):
        with pytest.raises(InvalidArgument, match="--aux-address x="):
            await svc.networks.create(NetworkSpec(name="b", subnet="10.3.0.0/24",
                                                     aux_addresses=bad))  # fmt: skip
    with pytest.raises(AgentError, match="aux"):
        await svc.networks.create(
            NetworkSpec(
                name="c", subnet="10.4.0.0/24", aux_addresses={"x": "10.4.0.9", "y": "10.4.0.9"}
            )
        )
    assert [n.name for n in svc.topo.networks.values()] == ["a"]


async def test_disconnect_answers_before_the_veth_is_deleted_and_frees_the_address_after(
    svc,
) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/30"))  # one address
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    svc.shared.kernel.reap_gate = trio.Event()  # hold the next batch back
    await svc.endpoints.disconnect("a", "ok1")
    assert ep.host_ifname in svc.shared.kernel.dying  # cut off, not yet deleted
    with pytest.raises(PoolExhausted):  # its address is not handed out while it may linger
        await svc.endpoints.connect(EndpointSpec(network="a", netns="ok2"))
    svc.shared.kernel.reap_gate.set()
    await svc.reaper.wait_idle()
    assert ep.host_ifname not in svc.shared.kernel.veths
    assert (await svc.endpoints.connect(EndpointSpec(network="a", netns="ok2"))).ip == ep.ip


async def test_connect_waits_for_the_namespace_previous_interface(svc, nursery) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    svc.shared.kernel.reap_gate = trio.Event()
    await svc.endpoints.disconnect("a", "ok1")
    done: list = []

    async def reconnect() -> None:
        done.append(await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1")))

    nursery.start_soon(reconnect)
    await trio.sleep(0.05)
    assert done == []  # eth0 still exists in the namespace until the batch deletes it
    # meanwhile the writer lock is free: other namespaces are served
    other = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok2"))
    svc.shared.kernel.reap_gate.set()
    await svc.reaper.wait_idle()
    await trio.sleep(0.01)
    assert done and done[0].ifname == "eth0" and done[0].ip != other.ip


async def test_rm_hands_the_bridge_to_the_reaper_and_a_same_subnet_create_waits(
    svc, nursery
) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    old = svc.topo.find_network("a").bridge
    svc.shared.kernel.reap_gate = trio.Event()  # hold the batch that deletes the old bridge
    await svc.networks.remove("a")
    assert svc.topo.networks == {} and svc.shared.firewall.networks == []  # rules gone at once
    assert old in svc.shared.kernel.bridges  # the device is still there, with 10.1.0.1/24
    made: list = []

    async def create_again() -> None:
        made.append(await svc.networks.create(NetworkSpec(name="b", subnet="10.1.0.0/25")))

    nursery.start_soon(create_again)
    # an unrelated subnet is not held back
    await svc.networks.create(NetworkSpec(name="c", subnet="10.2.0.0/24"))
    await trio.sleep(0.05)
    assert made == []  # its gateway would sit beside the old bridge's
    svc.shared.kernel.reap_gate.set()
    await svc.reaper.wait_idle()
    await trio.sleep(0.01)
    assert made and old not in svc.shared.kernel.bridges
    assert sorted(svc.shared.kernel.bridges.values()) == ["10.1.0.1/25", "10.2.0.1/24"]


async def test_rm_store_failure_keeps_the_network_and_its_rules(svc, monkeypatch) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    net = svc.topo.find_network("a")

    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(svc.shared.store, "transaction", broken)
    with pytest.raises(OSError):
        await svc.networks.remove("a")
    assert svc.topo.find_network("a") is net
    assert svc.shared.firewall.networks == bridges(svc, "a")  # the rules were put back
    assert net.bridge in svc.shared.kernel.bridges and svc.reaper.backlog == 0


async def test_prune_removes_every_unused_network_in_one_firewall_transaction(svc) -> None:
    await svc.networks.create(NetworkSpec(name="bridge", is_default=True))
    for name, subnet in (("a", "10.1.0.0/24"), ("b", "10.2.0.0/24"), ("c", "10.3.0.0/24")):
        await svc.networks.create(NetworkSpec(name=name, subnet=subnet))
    await svc.endpoints.connect(EndpointSpec(network="b", netns="ok1"))
    before = svc.shared.firewall.applies
    removed = [n.name for n in await svc.networks.prune()]
    assert sorted(removed) == ["a", "c"]  # the default and the used one stay
    assert svc.shared.firewall.applies == before + 1
    assert svc.shared.firewall.networks == bridges(svc, "b", "bridge")
    assert sorted(n.name for n in svc.shared.store.load().networks) == ["b", "bridge"]
    await svc.reaper.wait_idle()
    assert sorted(svc.shared.kernel.bridges.values()) == ["10.2.0.1/24", "172.17.0.1/16"]


async def test_reconciler_leaves_a_veth_being_attached_alone_and_repairs_one_set_down(svc) -> None:
    from agent.core import naming
    from agent.core.nlevents import LinkEvent
    from agent.service.reconcile import Reconciler

    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    kernel = svc.shared.kernel
    kernel.states = {ep.host_ifname: (False, 0)}  # down, as a veth is until its attach ends
    enslaved = kernel.enslaved
    reconciler = Reconciler(svc)

    def down(alias):
        return LinkEvent("new", 9, ep.host_ifname, "veth", alias, 0, False, naming.LINK_GROUP)

    async with svc.lock.shared():  # an attach in flight holds the lock shared
        with trio.fail_after(1):  # no exclusive lock is waited for: this returns at once
            await reconciler.on_event(down(None))
    assert enslaved == []
    await reconciler.on_event(down(naming.veth_alias(ep.id)))  # set down by hand: repaired
    assert enslaved == [ep.host_ifname]
