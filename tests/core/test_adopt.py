"""Start-up adoption with fakes: the topology rebuilt from the store, the kernel's links
converged to it (leftovers deleted, missing veths re-attached, vanished namespaces released)."""

from __future__ import annotations

import ipaddress

import msgspec

from agent.core import naming
from agent.core.bitmap import RangeAllocator
from agent.core.model import Endpoint, Network
from agent.core.topology import Topology
from agent.kernel.base import LinkInfo
from agent.service.adopt import adopt
from agent.store.sqlite import open_store
from tests.core.fakes import FakeKernel, FakeNamespaces

NET = Network(
    id="a" * 64, name="n", bridge="br-aaaaaaaaaaaa", subnet="10.1.0.0/24", gateway="10.1.0.1",
    ipv6=True, subnet6="fd00:1::/64", gateway6="fd00:1::1",
)  # fmt: skip


def _ep(n: int, *, netns: str = "", ip6: bool = True) -> Endpoint:
    ident = f"{n:x}" * 64
    return Endpoint(
        id=ident[:64], network_id=NET.id, netns=netns, netns_key=netns,
        ifname="eth0" if netns else "",
        host_ifname=naming.host_veth_name(ident[:64]), ip=f"10.1.0.{n + 1}",
        mac=f"02:42:0a:01:00:{n + 1:02x}", ip6=f"fd00:1::{n + 1}" if ip6 else None,
    )  # fmt: skip


def _link(index: int, name: str, alias: str, kind: str = "veth", master: int = 1) -> LinkInfo:
    return LinkInfo(index=index, name=name, kind=kind, alias=alias, master=master, up=True,
                    addresses=(), group=naming.LINK_GROUP)  # fmt: skip


async def test_adoption_converges_links_and_keeps_addresses(tmp_path) -> None:
    intact = _ep(1, netns="/run/netns/ok1")
    missing = _ep(2, netns="/run/netns/ok2")  # its veth is gone, its namespace is not
    no_v6 = _ep(3, netns="/run/netns/ok3")  # the same, and its namespace disabled IPv6
    vanished = _ep(4, netns="/run/netns/gone")  # its namespace is gone
    reserved = _ep(5)  # Docker's CreateEndpoint, no Join yet
    kernel, ns = FakeKernel(), FakeNamespaces()
    kernel.ipv6_disabled.add(no_v6.netns)
    bridge = _link(1, NET.bridge, naming.bridge_alias(NET.id), kind="bridge", master=0)
    links = [
        bridge,
        _link(2, intact.host_ifname, naming.veth_alias(intact.id)),
        _link(3, "na-leftover", naming.veth_alias("f" * 64)),  # an interrupted connect
        _link(4, "br-stale", naming.bridge_alias("e" * 64), kind="bridge", master=0),
    ]
    with open_store(tmp_path) as store:
        with store.transaction() as w:
            w.put_network(NET)
            for ep in (intact, missing, no_v6, vanished, reserved):
                w.put_endpoint(ep)
        topo = Topology(RangeAllocator)
        report = await adopt(state=store.load(), topo=topo, kernel=kernel, owned_links=links,
                             ns=ns, store=store)  # fmt: skip
        assert sorted(report.leftovers_deleted) == ["br-stale", "na-leftover"]
        assert report.endpoints_released == [vanished.id]
        assert sorted(report.endpoints_reattached) == sorted([missing.id, no_v6.id])
        assert set(kernel.veths) == {missing.host_ifname, no_v6.host_ifname}
        assert kernel.veths[missing.host_ifname].address == "10.1.0.3/24"
        adopted = {e.id: e for e in store.load().endpoints}
        assert adopted.keys() == {intact.id, missing.id, no_v6.id, reserved.id}
        assert adopted[no_v6.id].ip6 is None  # on record as it is in the kernel
        assert topo.endpoints[no_v6.id].ip6 is None
        alloc, alloc6 = topo.allocators[NET.id], topo.allocators6[NET.id]
        for ep in (intact, missing, no_v6, reserved):
            assert alloc.is_allocated(ipaddress.IPv4Address(ep.ip))
        assert not alloc.is_allocated(ipaddress.IPv4Address(vanished.ip))
        assert not alloc6.is_allocated(ipaddress.IPv6Address(no_v6.ip6 or ""))
        assert alloc6.is_allocated(ipaddress.IPv6Address(reserved.ip6 or ""))
        assert topo.find_endpoint(reserved.id) == reserved and not reserved.joined
        assert msgspec.structs.replace(no_v6, ip6=None) == adopted[no_v6.id]
