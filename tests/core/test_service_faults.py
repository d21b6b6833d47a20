"""All or nothing under faults, with fakes: each request that fails part-way changes nothing,
and reports its first error even when a rollback step fails too."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent.core import marks
from agent.core.errors import (
    Conflict,
    FirewallApply,
    InvalidArgument,
    KernelError,
    NotFound,
    StorageError,
)
from agent.core.model import PortMapping
from agent.core.plan import EndpointSpec, NetworkSpec
from agent.frontends.cli.output import EXIT_CODES
from agent.service import Service
from agent.store.sqlite import open_store

WEB = (PortMapping(protocol="tcp", host_port=8080, container_port=80),)


def _broken_store(monkeypatch, svc: Service) -> None:
    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(svc.shared.store, "transaction", broken)


async def test_disconnect_with_a_full_disk_changes_nothing(svc, monkeypatch) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    _broken_store(monkeypatch, svc)
    with pytest.raises(OSError, match="disk full"):
        await svc.endpoints.disconnect("a", "ok1")
    kernel, firewall = svc.shared.kernel, svc.shared.firewall
    assert ep.host_ifname in kernel.veths and not kernel.dying  # never cut off
    assert firewall.forwards == 1  # its port rules stay
    assert svc.topo.endpoints[ep.id] == ep
    monkeypatch.undo()
    assert svc.shared.store.load().endpoints == [ep]


async def test_disconnect_whose_retire_fails_puts_record_and_rules_back(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    svc.shared.kernel.fail_retire = True
    with pytest.raises(KernelError, match="retire failed"):
        await svc.endpoints.disconnect("a", "ok1")
    assert svc.shared.firewall.forwards == 1
    assert svc.shared.store.load().endpoints == [ep]
    assert svc.topo.endpoints[ep.id] == ep
    svc.shared.kernel.fail_retire = False
    await svc.endpoints.disconnect("a", "ok1")  # and it can still go
    assert svc.shared.firewall.forwards == 0 and svc.shared.store.load().endpoints == []
    net = svc.topo.find_network("a")
    assert svc.shared.firewall.networks == [net.bridge]  # only the ports went


async def test_a_failing_rollback_still_deletes_the_bridge_and_keeps_the_first_error(
    svc, monkeypatch
) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    firewall = svc.shared.firewall
    applies = firewall.apply

    async def first_ok_then_broken(policy):
        await applies(policy)
        firewall.fail = True  # the rollback's transaction will fail

    monkeypatch.setattr(firewall, "apply", first_ok_then_broken)
    _store_fail = OSError("disk full")

    def broken(*_args):
        raise _store_fail

    monkeypatch.setattr(svc.shared.store, "transaction", broken)
    with pytest.raises(OSError) as caught:
        await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
    assert caught.value is _store_fail  # the cause, not the rollback's FirewallApply
    assert any("rules_back" in note for note in caught.value.__notes__)
    assert list(svc.shared.kernel.bridges) == [svc.topo.find_network("a").bridge]


async def test_disconnect_force_makes_a_missing_endpoint_not_an_error(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    with pytest.raises(NotFound):
        await svc.endpoints.disconnect("a", "ok1")
    assert await svc.endpoints.disconnect("a", "ok1", force=True) is None
    await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    assert (await svc.endpoints.disconnect("a", "ok1", force=True)) is not None
    assert await svc.endpoints.remove("nope", force=True) is None


async def test_publish_with_a_full_disk_puts_the_rules_back(svc, monkeypatch) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    more = [PortMapping(protocol="udp", host_port=5353, container_port=53)]
    _broken_store(monkeypatch, svc)
    with pytest.raises(OSError):
        await svc.ports.publish("ok1", more)
    assert svc.shared.firewall.forwards == 1
    assert svc.topo.endpoints[ep.id].ports == WEB


async def test_reserve_then_attach_then_remove_by_attachment(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    spec = EndpointSpec(network="a", attachment="ctr1/eth0", ip="10.1.0.7")
    reserved = await svc.endpoints.reserve(spec)
    assert (reserved.netns, reserved.ip, reserved.joined) == ("", "10.1.0.7", False)
    assert svc.shared.kernel.veths == {}
    assert svc.shared.store.load().endpoints == [reserved]
    with pytest.raises(Conflict):  # the key is taken
        await svc.endpoints.reserve(EndpointSpec(network="a", attachment="ctr1/eth0"))
    joined = await svc.endpoints.attach("ctr1/eth0", "ok1", ifname="net0")
    assert (joined.id, joined.ifname, joined.ip, joined.default_route) == (
        reserved.id, "net0", "10.1.0.7", True,
    )  # fmt: skip
    assert svc.shared.kernel.veths[joined.host_ifname].ifname == "net0"
    assert svc.topo.endpoints_in("/run/netns/ok1") == [joined]
    with pytest.raises(Conflict):  # joined already
        await svc.endpoints.attach("ctr1/eth0", "ok2")
    assert await svc.endpoints.remove("ctr1/eth0") == joined
    assert svc.shared.store.load().endpoints == [] and svc.topo.endpoints == {}


async def test_a_failed_attach_leaves_the_endpoint_reserved(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    reserved = await svc.endpoints.reserve(EndpointSpec(network="a", attachment="k"))
    svc.shared.kernel.fail_attach = True
    with pytest.raises(KernelError):
        await svc.endpoints.attach("k", "ok1")
    assert svc.topo.endpoints[reserved.id] == reserved
    assert svc.topo.endpoints_in("/run/netns/ok1") == []
    assert svc.shared.store.load().endpoints == [reserved]


async def test_interface_names_are_checked_and_named_in_errors(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    with pytest.raises(InvalidArgument) as caught:
        await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ifname="eth0\n"))
    assert caught.value.data["field"] == "ifname"
    await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ifname="data0"))
    await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
    with pytest.raises(Conflict, match="data0"):
        await svc.endpoints.connect(EndpointSpec(network="b", netns="ok1", ifname="data0"))
    with pytest.raises(InvalidArgument) as caught:
        await svc.networks.create(NetworkSpec(name="c", bridge="br0\n"))
    assert caught.value.data["field"] == "bridge"


async def test_ipv6_disabled_namespace_gets_ipv4_only_and_its_address_back(svc) -> None:
    await svc.networks.create(NetworkSpec(name="d", subnet="10.1.0.0/24", ipv6=True))
    svc.shared.kernel.ipv6_disabled.add("/run/netns/ok1")
    ep = await svc.endpoints.connect(EndpointSpec(network="d", netns="ok1"))
    assert ep.ip6 is None and svc.shared.store.load().endpoints[0].ip6 is None
    net = svc.topo.find_network("d")
    alloc6 = svc.topo.allocators6[net.id]
    assert alloc6.used == 0  # the ::2 it was given went back to the pool
    svc.shared.kernel.ipv6_disabled.add("/run/netns/ok2")
    wanted = str(alloc6.subnet.network_address + 9)
    with pytest.raises(InvalidArgument):  # asked for: refused, nothing left
        await svc.endpoints.connect(EndpointSpec(network="d", netns="ok2", ip6=wanted))
    assert alloc6.used == 0 and svc.shared.kernel.veths.keys() == {ep.host_ifname}


async def test_a_request_cancelled_while_waiting_for_the_lock_leaves_it_usable(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    async with trio.open_nursery() as nursery:
        release = trio.Event()

        async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with svc.lock.shared():
                task_status.started()
                await release.wait()

        await nursery.start(reader)
        with trio.move_on_after(0.05) as scope:  # a create waits for the connect in flight
            await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
        assert scope.cancelled_caught
        release.set()
    with trio.fail_after(1):
        await svc.networks.create(NetworkSpec(name="c", subnet="10.3.0.0/24"))
    with pytest.raises(FirewallApply):
        svc.shared.firewall.fail = True
        await svc.networks.create(NetworkSpec(name="e", subnet="10.4.0.0/24"))


async def test_concurrent_disconnects_with_ports_leave_no_rule_behind(svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    for i in range(4):
        ports = (PortMapping(protocol="tcp", host_port=8080 + i, container_port=80),)
        await svc.endpoints.connect(EndpointSpec(network="a", netns=f"ok{i}", ports=ports))
    assert svc.shared.firewall.forwards == 4
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(svc.endpoints.disconnect, "a", f"ok{i}")
    assert svc.shared.firewall.forwards == 0  # each saw the others' removals


def _full_disk(monkeypatch, svc: Service) -> None:
    """Every store write fails as sqlite fails on a full disk (a real one: tests/core/
    test_store_faults.py and tests/e2e/test_state_faults.py)."""

    def full(_ops):
        raise StorageError("cannot write the state database: database or disk is full")

    monkeypatch.setattr(svc.shared.store, "_commit", full)


async def test_sandbox_rm_with_a_full_disk_changes_nothing(svc, monkeypatch) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    await svc.sandboxes.run("okbox", EndpointSpec(network="a"))
    await svc.endpoints.disconnect("a", "okbox")  # a sandbox with no endpoint left
    _full_disk(monkeypatch, svc)
    with pytest.raises(StorageError):
        await svc.sandboxes.remove("okbox")
    assert svc.shared.ns.named == {"okbox"}  # the namespace is still there
    assert "okbox" in svc.topo.sandboxes
    monkeypatch.undo()
    assert [sb.name for sb in svc.shared.store.load().sandboxes] == ["okbox"]
    await svc.sandboxes.remove("okbox")  # and with room again it goes
    assert svc.shared.ns.named == set() and svc.shared.store.load().sandboxes == []


async def test_sandbox_rm_whose_namespace_deletion_fails_keeps_its_record(svc, monkeypatch) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    await svc.sandboxes.run("okbox", EndpointSpec(network="a"))

    async def broken(_name):
        raise KernelError("cannot unmount")

    monkeypatch.setattr(svc.shared.ns, "delete_named", broken)
    with pytest.raises(KernelError):
        await svc.sandboxes.remove("okbox")
    assert [sb.name for sb in svc.shared.store.load().sandboxes] == ["okbox"]
    assert "okbox" in svc.topo.sandboxes


async def test_every_mutation_with_a_full_disk_fails_as_storage_and_changes_nothing(
    svc, monkeypatch
) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    kernel, firewall, store = svc.shared.kernel, svc.shared.firewall, svc.shared.store
    before = (set(kernel.bridges), set(kernel.veths), firewall.forwards, store.snapshot())
    _full_disk(monkeypatch, svc)
    more = [PortMapping(protocol="udp", host_port=5353, container_port=53)]
    attempts = [
        svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24")),
        svc.networks.remove("a", force=True),
        svc.endpoints.connect(EndpointSpec(network="a", netns="ok2")),
        svc.endpoints.disconnect("a", "ok1"),
        svc.endpoints.remove(ep.id),
        svc.ports.publish("ok1", more),
        svc.ports.unpublish("ok1", list(WEB)),
        svc.sandboxes.run("okbox", EndpointSpec(network="a")),
    ]
    for attempt in attempts:
        with pytest.raises(StorageError) as caught:
            await attempt
        assert caught.value.kind == "storage" and EXIT_CODES["storage"] == 8
        assert (set(kernel.bridges), set(kernel.veths), firewall.forwards) == before[:3]
        assert not kernel.dying and svc.shared.ns.named == set()
    assert svc.topo.find_network("a").name == "a" and svc.topo.endpoints[ep.id] == ep
    assert svc.networks.filter() and svc.endpoints.filter() == [ep]  # reads still served
    monkeypatch.undo()
    assert store.load() == before[3]


async def test_a_database_deleted_while_running_loses_no_acknowledged_change(svc) -> None:
    store = svc.shared.store
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    for suffix in ("", "-wal", "-shm"):  # `rm -f netagent.db*` while agentd runs
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    await svc.networks.create(NetworkSpec(name="b", subnet="10.2.0.0/24"))
    with open_store(store.path.parent) as restarted:  # what a restart would read
        state = restarted.load()
    assert {n.name for n in state.networks} == {"a", "b"}
    assert state.endpoints == [ep]
    assert state.meta["cursor:" + ep.network_id]


async def test_publish_rewrites_the_veth_mark_and_puts_it_back_if_the_store_fails(
    svc, monkeypatch
) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    kernel = svc.shared.kernel
    assert marks.decode(kernel.veths[ep.host_ifname].alias)[2].ports  # set at creation
    more = [PortMapping(protocol="udp", host_port=5353, container_port=53)]
    published = await svc.ports.publish("ok1", more)
    mark = marks.decode(kernel.aliases[ep.host_ifname])[2]
    assert marks.endpoint_of(ep.id, ep.network_id, ep.host_ifname, mark) == published
    _full_disk(monkeypatch, svc)
    with pytest.raises(StorageError):
        await svc.ports.unpublish("ok1", list(WEB))
    assert kernel.aliases[ep.host_ifname] == marks.endpoint_mark(published)  # put back
    monkeypatch.undo()
    kernel.fail_alias = True
    with pytest.raises(KernelError):
        await svc.ports.unpublish("ok1", list(WEB))
    assert svc.shared.firewall.forwards == 2 and svc.topo.endpoints[ep.id] == published
