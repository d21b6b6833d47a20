"""Start-up adoption of Docker's endpoints (fakes): an endpoint joined through an engine that
moved the veth's peer into a namespace of its own (`naming.ENGINE_KEY_PREFIX`) is kept while
its host veth exists, whatever its path resolves to now, and released once it is gone."""

from __future__ import annotations

import ipaddress

import msgspec

from agent.core import naming
from agent.core.bitmap import RangeAllocator
from agent.core.topology import Topology
from agent.service.adopt import adopt
from agent.store.sqlite import open_store
from tests.core.fakes import FakeKernel, FakeNamespaces
from tests.core.test_adopt import NET, _ep, _link


def _docker_ep(n: int):
    ep = _ep(n, ip6=False)
    sandbox = f"/var/run/docker/netns/{n:012x}"  # not a namespace the fakes know: Docker's
    return msgspec.structs.replace(
        ep, netns=sandbox, netns_key=naming.engine_netns_key(sandbox),
        ifname=naming.host_peer_name(ep.id), attachment=f"{n:x}" * 64,
    )  # fmt: skip


async def test_docker_endpoints_are_kept_by_their_veth(tmp_path) -> None:
    alive, gone = _docker_ep(1), _docker_ep(2)
    kernel, ns = FakeKernel(), FakeNamespaces()
    links = [
        _link(1, NET.bridge, naming.bridge_alias(NET.id), kind="bridge", master=0),
        _link(2, alive.host_ifname, naming.veth_alias(alive.id)),
    ]
    with open_store(tmp_path) as store:
        with store.transaction() as w:
            w.put_network(NET)
            w.put_endpoint(alive)
            w.put_endpoint(gone)
        topo = Topology(RangeAllocator)
        report = await adopt(state=store.load(), topo=topo, kernel=kernel, owned_links=links,
                             ns=ns, store=store)  # fmt: skip
        assert report.endpoints_released == [gone.id]
        assert report.endpoints_reattached == [] and kernel.veths == {}
        assert [e.id for e in store.load().endpoints] == [alive.id]
        assert topo.endpoint_of_attachment(alive.attachment) == alive
        alloc = topo.allocators[NET.id]
        assert alloc.is_allocated(ipaddress.IPv4Address(alive.ip))
        assert not alloc.is_allocated(ipaddress.IPv4Address(gone.ip))
