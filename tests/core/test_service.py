"""Service logic with fakes of the shells (not mocks): all-or-nothing requests, rollbacks.

The real kernel and iptables are exercised by tests/shell and tests/e2e; here the fakes let us
fail each step on purpose and check that nothing was half-applied.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio

from agent.api import protocol as p
from agent.core.bitmap import RangeAllocator
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
from agent.core.policy import EMPTY as EMPTY_POLICY
from agent.core.policy import Policy
from agent.core.topology import Topology
from agent.firewall.monitor import NftChange
from agent.service import Service
from agent.store.sqlite import open_store


class FakeKernel:
    def __init__(self) -> None:
        self.bridges: dict[str, str] = {}
        self.veths: dict[str, dict] = {}
        self.fail_attach = False
        self.fail_bridge = False
        self.routes: list[ipaddress.IPv4Network] = []
        self.dying: set[str] = set()
        self.reap_gate: trio.Event | None = None

    async def ensure_bridge(self, *, name, alias, address, mtu=1500, address6=None) -> int:
        await trio.sleep(0)
        if self.fail_bridge:
            raise Conflict(f"{name} is a veth, not a bridge", bridge=name)
        self.bridges[name] = address
        return len(self.bridges)

    async def set_ip6_forward(self) -> None:
        self.ip6_forward = True

    async def delete_bridge(self, name, address=None, address6=None, *, retire=False) -> bool:
        return self.bridges.pop(name, None) is not None

    async def attach(self, **kw) -> bool:
        if self.fail_attach:
            raise KernelError("attach failed on purpose")
        self.veths[kw["host_ifname"]] = kw
        return True

    async def detach(self, host_ifname) -> bool:
        return self.veths.pop(host_ifname, None) is not None

    async def retire(self, host_ifname) -> bool:
        if host_ifname not in self.veths:
            return False
        self.dying.add(host_ifname)
        return True

    async def reap(self, bridges=()) -> bool:
        if self.reap_gate is not None:
            await self.reap_gate.wait()
        for name, _, _ in bridges:
            self.bridges.pop(name, None)
        for name in self.dying:
            self.veths.pop(name, None)
        found, self.dying = bool(self.dying), set()
        return found

    async def host_routes(self):
        return list(self.routes)


class FakeFirewall:
    """A `Firewall` (agent.firewall.base) that keeps the last policy applied, or fails."""

    name = "fake"

    def __init__(self) -> None:
        self.policy = EMPTY_POLICY
        self.fail = False
        self.applies = 0

    async def setup(self, policy: Policy) -> None:
        self.policy = policy

    async def apply(self, policy: Policy) -> int:
        self.applies += 1
        if self.fail:
            raise FirewallApply("restore failed on purpose", line="-A X")
        self.policy = policy
        return 1

    async def repair(self, policy: Policy) -> list[str]:
        return []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def foreign(self, change: NftChange) -> bool:
        return False

    def bridge_recreated(self, bridge: str) -> None:
        pass

    def text(self) -> str:
        return ""

    def rule_count(self) -> int:
        return 0


def firewalled(svc: Service) -> list[str]:
    """The names of the networks whose rules the fake firewall holds (ids if unknown)."""
    names = {n.id: n.name for n in svc.topo.networks.values()}
    return sorted(names.get(n.id, n.id) for n in svc.firewall.policy.v4.networks)


class FakeNamespaces:
    def __init__(self) -> None:
        self.named: set[str] = set()

    def resolve(self, netns: str) -> str:
        return netns if netns.startswith("/") else f"/run/netns/{netns}"

    def netns_key(self, path: str) -> str:
        if not path.startswith("/run/netns/ok"):
            raise NotFound(f"no namespace at {path}")
        return path

    async def create_named(self, name: str) -> str:
        self.named.add(name)
        return f"/run/netns/{name}"

    async def delete_named(self, name: str) -> bool:
        self.named.discard(name)
        return True


@pytest.fixture
async def svc(tmp_path, nursery):
    with open_store(tmp_path) as store:
        service = Service(
            topo=Topology(RangeAllocator),
            kernel=FakeKernel(),
            firewall=FakeFirewall(),
            namespaces=FakeNamespaces(),
            store=store,
        )
        await nursery.start(service.reaper.serve)
        yield service


async def test_create_picks_docker_pools_in_order_and_skips_routes(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="bridge"), is_default=True)
    svc.kernel.routes = [ipaddress.IPv4Network("172.18.5.0/24")]
    net = await svc.create_network(p.NetworkCreate(name="a"))
    assert (net.subnet, net.gateway, net.bridge) == (
        "172.19.0.0/16",
        "172.19.0.1",
        f"br-{net.id[:12]}",
    )
    assert svc.kernel.bridges[net.bridge] == "172.19.0.1/16"
    assert svc.store.load().networks[-1].name in {"a", "bridge"}


async def test_firewall_failure_leaves_no_bridge_and_no_record(svc) -> None:
    svc.firewall.fail = True
    with pytest.raises(FirewallApply):
        await svc.create_network(p.NetworkCreate(name="a"))
    assert svc.kernel.bridges == {}
    assert svc.topo.networks == {}
    assert svc.store.load().networks == []


async def test_bridge_failure_takes_the_new_rules_back(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    svc.kernel.fail_bridge = True  # the rules are applied meanwhile, then must go again
    with pytest.raises(Conflict):
        await svc.create_network(p.NetworkCreate(name="b", subnet="10.2.0.0/24"))
    assert firewalled(svc) == ["a"]
    assert [n.name for n in svc.topo.networks.values()] == ["a"]
    assert [n.name for n in svc.store.load().networks] == ["a"]


async def test_kernel_failure_on_connect_releases_the_address(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    svc.kernel.fail_attach = True
    with pytest.raises(KernelError):
        await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    svc.kernel.fail_attach = False
    ep = await svc.connect(p.EndpointConnect(network="a", netns="ok1", ip="10.1.0.2"))
    assert ep.ip == "10.1.0.2"  # it was released, so the static request succeeds
    assert svc.store.load().endpoints == [ep]


async def test_connect_twice_conflicts_and_remove_with_endpoints_is_busy(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    with pytest.raises(Conflict):
        await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    with pytest.raises(Busy):
        await svc.remove_network(p.NetworkRemove(network="a"))
    assert len(svc.kernel.veths) == 1
    await svc.remove_network(p.NetworkRemove(network="a", force=True))
    await svc.reaper.wait_idle()  # the veth is deleted by the next batch
    assert svc.kernel.veths == {} and svc.kernel.bridges == {}
    assert svc.store.load().networks == [] and svc.store.load().endpoints == []


async def test_run_failure_deletes_the_namespace_it_created(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    svc.kernel.fail_attach = True
    with pytest.raises(KernelError):
        await svc.run(p.SandboxRun(name="ok-sb", network="a"))
    assert svc.ns.named == set()
    assert svc.store.load().sandboxes == []
    with pytest.raises(NotFound):
        await svc.run(p.SandboxRun(name="ok-sb", network="missing"))
    assert svc.ns.named == set()


async def test_second_namespace_interface_is_eth1(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    await svc.create_network(p.NetworkCreate(name="b", subnet="10.2.0.0/24"))
    e0 = await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    e1 = await svc.connect(p.EndpointConnect(network="b", netns="ok1"))
    assert (e0.ifname, e1.ifname) == ("eth0", "eth1")
    assert e0.mac == "02:42:0a:01:00:02"


async def test_aux_addresses_are_never_handed_out(svc) -> None:
    aux = {"router": "10.1.0.2", "printer": "10.1.0.4"}
    net = await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24",
                                                   aux_addresses=aux))  # fmt: skip
    assert net.aux_addresses == aux
    ips = [(await svc.connect(p.EndpointConnect(network="a", netns=f"ok{i}"))).ip
           for i in range(2)]  # fmt: skip
    assert ips == ["10.1.0.3", "10.1.0.5"]
    with pytest.raises(AgentError):
        await svc.connect(p.EndpointConnect(network="a", netns="ok9", ip="10.1.0.2"))
    for bad in ({"x": "10.2.0.1"}, {"x": "10.1.0.1"}, {"x": "nope"}):
        with pytest.raises(InvalidArgument, match="--aux-address x="):
            await svc.create_network(p.NetworkCreate(name="b", subnet="10.3.0.0/24",
                                                     aux_addresses=bad))  # fmt: skip
    with pytest.raises(AgentError, match="aux"):
        await svc.create_network(
            p.NetworkCreate(
                name="c", subnet="10.4.0.0/24", aux_addresses={"x": "10.4.0.9", "y": "10.4.0.9"}
            )
        )
    assert [n.name for n in svc.topo.networks.values()] == ["a"]


async def test_disconnect_answers_before_the_veth_is_deleted_and_frees_the_address_after(
    svc,
) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/30"))  # one address
    ep = await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    svc.kernel.reap_gate = trio.Event()  # hold the next batch back
    await svc.disconnect(p.EndpointDisconnect(network="a", netns="ok1"))
    assert ep.host_ifname in svc.kernel.dying  # cut off, not yet deleted
    with pytest.raises(PoolExhausted):  # its address is not handed out while it may linger
        await svc.connect(p.EndpointConnect(network="a", netns="ok2"))
    svc.kernel.reap_gate.set()
    await svc.reaper.wait_idle()
    assert ep.host_ifname not in svc.kernel.veths
    assert (await svc.connect(p.EndpointConnect(network="a", netns="ok2"))).ip == ep.ip


async def test_connect_waits_for_the_namespace_previous_interface(svc, nursery) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    svc.kernel.reap_gate = trio.Event()
    await svc.disconnect(p.EndpointDisconnect(network="a", netns="ok1"))
    done: list = []

    async def reconnect() -> None:
        done.append(await svc.connect(p.EndpointConnect(network="a", netns="ok1")))

    nursery.start_soon(reconnect)
    await trio.sleep(0.05)
    assert done == []  # eth0 still exists in the namespace until the batch deletes it
    # meanwhile the writer lock is free: other namespaces are served
    other = await svc.connect(p.EndpointConnect(network="a", netns="ok2"))
    svc.kernel.reap_gate.set()
    await svc.reaper.wait_idle()
    await trio.sleep(0.01)
    assert done and done[0].ifname == "eth0" and done[0].ip != other.ip


async def test_rm_hands_the_bridge_to_the_reaper_and_a_same_subnet_create_waits(
    svc, nursery
) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    old = svc.topo.find_network("a").bridge
    svc.kernel.reap_gate = trio.Event()  # hold the batch that deletes the old bridge
    await svc.remove_network(p.NetworkRemove(network="a"))
    assert svc.topo.networks == {} and firewalled(svc) == []  # rules gone at once
    assert old in svc.kernel.bridges  # the device is still there, with 10.1.0.1/24
    made: list = []

    async def create_again() -> None:
        made.append(await svc.create_network(p.NetworkCreate(name="b", subnet="10.1.0.0/25")))

    nursery.start_soon(create_again)
    # an unrelated subnet is not held back
    await svc.create_network(p.NetworkCreate(name="c", subnet="10.2.0.0/24"))
    await trio.sleep(0.05)
    assert made == []  # its gateway would sit beside the old bridge's
    svc.kernel.reap_gate.set()
    await svc.reaper.wait_idle()
    await trio.sleep(0.01)
    assert made and old not in svc.kernel.bridges
    assert sorted(svc.kernel.bridges.values()) == ["10.1.0.1/25", "10.2.0.1/24"]


async def test_rm_store_failure_keeps_the_network_and_its_rules(svc, monkeypatch) -> None:
    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    net = svc.topo.find_network("a")

    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(svc.store, "transaction", broken)
    with pytest.raises(OSError):
        await svc.remove_network(p.NetworkRemove(network="a"))
    assert svc.topo.find_network("a") is net
    assert firewalled(svc) == ["a"]  # the rules were put back
    assert net.bridge in svc.kernel.bridges and svc.reaper.backlog == 0


async def test_prune_removes_every_unused_network_in_one_firewall_transaction(svc) -> None:
    await svc.create_network(p.NetworkCreate(name="bridge"), is_default=True)
    for name, subnet in (("a", "10.1.0.0/24"), ("b", "10.2.0.0/24"), ("c", "10.3.0.0/24")):
        await svc.create_network(p.NetworkCreate(name=name, subnet=subnet))
    await svc.connect(p.EndpointConnect(network="b", netns="ok1"))
    before = svc.firewall.applies
    removed = await svc.prune_networks(p.NetworkFilter())
    assert sorted(removed.removed) == ["a", "c"]  # the default and the used one stay
    assert svc.firewall.applies == before + 1
    assert firewalled(svc) == ["b", "bridge"]
    assert sorted(n.name for n in svc.store.load().networks) == ["b", "bridge"]
    await svc.reaper.wait_idle()
    assert sorted(svc.kernel.bridges.values()) == ["10.2.0.1/24", "172.17.0.1/16"]


async def test_reconciler_leaves_a_veth_being_attached_alone_and_repairs_one_set_down(svc) -> None:
    from agent.core import naming
    from agent.core.nlevents import LinkEvent
    from agent.reconcile import Reconciler

    await svc.create_network(p.NetworkCreate(name="a", subnet="10.1.0.0/24"))
    ep = await svc.connect(p.EndpointConnect(network="a", netns="ok1"))
    states = {ep.host_ifname: (False, 0)}  # down, as a veth is until its attach brings it up
    enslaved: list[str] = []

    async def link_state(name):
        return states.get(name)

    async def enslave(host_ifname, bridge):
        enslaved.append(host_ifname)

    svc.kernel.link_state, svc.kernel.enslave = link_state, enslave
    reconciler = Reconciler(svc, svc.firewall)

    def down(alias):
        return LinkEvent("new", 9, ep.host_ifname, "veth", alias, 0, False, naming.LINK_GROUP)

    async with svc.lock.shared():  # an attach in flight holds the lock shared
        with trio.fail_after(1):  # no exclusive lock is waited for: this returns at once
            await reconciler.on_event(down(None))
    assert enslaved == []
    await reconciler.on_event(down(naming.veth_alias(ep.id)))  # set down by hand: repaired
    assert enslaved == [ep.host_ifname]
