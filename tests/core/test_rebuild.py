"""The store rebuilt from the kernel's ownership marks (with fakes): what a service recorded
comes back from its links' aliases, adoption then keeps every marked link, and the rebuild
runs only when the store is unusable."""

from __future__ import annotations

import msgspec
import pytest

from agent.core import marks, naming
from agent.core.attach import attachment_of, gateway_cidr
from agent.core.bitmap import RangeAllocator
from agent.core.model import PortMapping
from agent.core.plan import EndpointSpec, NetworkSpec
from agent.core.topology import Topology
from agent.kernel.base import LinkInfo
from agent.service import Service, rebuild
from agent.service.adopt import adopt
from agent.store.sqlite import State, open_store
from tests.core.fakes import FakeKernel, FakeNamespaces

WEB = (PortMapping(protocol="tcp", host_port=8080, container_port=80),)


def _links(svc: Service) -> list[LinkInfo]:
    """The links the fake kernel holds, with the aliases the service gave them."""
    topo, out = svc.topo, []
    index = {}
    for i, net in enumerate(topo.networks.values(), start=1):
        index[net.id] = i
        out.append(LinkInfo(index=i, name=net.bridge, kind="bridge", alias=marks.network_mark(net),
                            master=0, up=True, addresses=(gateway_cidr(net),),
                            group=naming.LINK_GROUP))  # fmt: skip
    for j, ep in enumerate(topo.endpoints.values(), start=100):
        alias = svc.shared.kernel.aliases.get(ep.host_ifname)
        att = svc.shared.kernel.veths[ep.host_ifname]
        out.append(LinkInfo(index=j, name=ep.host_ifname, kind="veth", alias=alias or att.alias,
                            master=index[ep.network_id], up=True, addresses=(),
                            group=naming.LINK_GROUP))  # fmt: skip
    return out


def _whole(state: State) -> tuple:
    """Comparable: creation times are kept to the second in marks."""
    nets = sorted(
        (msgspec.structs.replace(n, created=float(int(n.created))) for n in state.networks),
        key=lambda n: n.id,
    )
    return (
        nets,
        sorted(state.endpoints, key=lambda e: e.id),
        sorted(state.sandboxes, key=lambda s: s.name),
    )


async def test_the_state_comes_back_from_the_marks(svc) -> None:
    await svc.networks.create(NetworkSpec(name="bridge", is_default=True))
    await svc.networks.create(
        NetworkSpec(name="a", subnet="10.1.0.0/24", labels={"team": "web"}, icc=False)
    )
    await svc.networks.create(NetworkSpec(name="d", subnet="10.2.0.0/24", ipv6=True))
    await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    await svc.endpoints.connect(EndpointSpec(network="d", netns="ok1", ip="10.2.0.9"))
    await svc.sandboxes.run("okbox", EndpointSpec(network="d"))
    more = [PortMapping(protocol="udp", host_port=5353, container_port=53, host_ip="10.0.0.1")]
    await svc.ports.publish("ok1", more, network="a")
    state, report = rebuild.state_from_links(_links(svc))
    stored = svc.shared.store.load()
    assert _whole(state) == _whole(stored)
    assert state.meta["last_subnet"] == "10.2.0.0/24"
    assert sorted(report.networks) == ["a", "bridge", "d"] and len(report.endpoints) == 3
    assert report.sandboxes == ["okbox"] and report.incomplete == [] == report.unreadable


async def test_an_endpoint_finds_its_network_by_its_bridge_if_the_prefix_does_not_match(
    svc,
) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    links = _links(svc)
    other = msgspec.structs.replace(ep, network_id="f" * 64)
    veth = msgspec.structs.replace(links[1], alias=marks.endpoint_mark(other))
    state, _ = rebuild.state_from_links([links[0], veth])
    assert state.endpoints == [ep]
    state, report = rebuild.state_from_links([veth])  # no bridge at all: kept, not guessed
    assert state.endpoints == [] and report.unreadable == [ep.host_ifname]


@pytest.mark.parametrize(
    ("opened", "networks", "marked", "expected"),
    [
        ("existing", True, True, False),  # the usual restart: leftovers are leftovers
        ("new", False, True, True),  # deleted while agentd was down
        ("corrupt", False, True, True),  # kept aside at open
        ("existing", False, True, True),  # emptied
        ("new", False, False, False),  # a first start
    ],
)
def test_a_rebuild_happens_only_without_a_usable_store(opened, networks, marked, expected) -> None:
    net = msgspec.json.decode(
        msgspec.json.encode({"id": "a" * 64, "name": "n", "bridge": "br-a", "subnet":
                             "10.1.0.0/24", "gateway": "10.1.0.1"}),
        type=__import__("agent.core.model", fromlist=["Network"]).Network,
    )  # fmt: skip
    state = State(networks=[net] if networks else [], endpoints=[], sandboxes=[], meta={})
    alias = marks.network_mark(net) if marked else "docker0 bridge"
    link = LinkInfo(index=1, name="br-a", kind="bridge", alias=alias, master=0, up=True,
                    addresses=(), group=naming.LINK_GROUP)  # fmt: skip
    assert rebuild.needed(opened, state, [link]) is expected


async def test_adoption_after_a_rebuild_keeps_marked_links_it_cannot_read(tmp_path, svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1"))
    links = _links(svc)
    old = LinkInfo(index=50, name="na-old", kind="veth", alias=naming.veth_alias("e" * 64),
                   master=1, up=True, addresses=(), group=naming.LINK_GROUP)  # fmt: skip
    for keep in (True, False):
        kernel = FakeKernel()
        kernel.veths[ep.host_ifname] = attachment_of(svc.topo.find_network("a"), ep)
        with open_store(tmp_path / str(keep)) as store:
            state, _ = rebuild.rebuild(store, [*links, old])
            topo = Topology(RangeAllocator)
            report = await adopt(state=state, topo=topo, kernel=kernel, owned_links=[*links, old],
                                 ns=FakeNamespaces(), store=store, keep_unknown=keep)  # fmt: skip
            assert topo.endpoints == {ep.id: ep}
            assert store.load().endpoints == [ep]
        if keep:
            assert report.unknown_kept == ["na-old"] and report.leftovers_deleted == []
        else:
            assert report.leftovers_deleted == ["na-old"]


async def test_adoption_gives_links_of_an_older_agentd_their_marks(tmp_path, svc) -> None:
    await svc.networks.create(NetworkSpec(name="a", subnet="10.1.0.0/24"))
    ep = await svc.endpoints.connect(EndpointSpec(network="a", netns="ok1", ports=WEB))
    net = svc.topo.find_network("a")
    old = [
        msgspec.structs.replace(link, alias=link.alias.rsplit(":", 1)[0]) for link in _links(svc)
    ]  # what an agentd before marks wrote: `netagent:net:<id>`, `netagent:ep:<id>`
    assert not any(marks.has_payload(link.alias) for link in old)
    kernel = FakeKernel()
    kernel.veths[ep.host_ifname] = attachment_of(net, ep)
    report = await adopt(state=svc.shared.store.load(), topo=Topology(RangeAllocator),
                         kernel=kernel, owned_links=old, ns=FakeNamespaces(),
                         store=svc.shared.store)  # fmt: skip
    assert sorted(report.marks_refreshed) == sorted([net.bridge, ep.host_ifname])
    state, _ = rebuild.state_from_links(
        [msgspec.structs.replace(link, alias=kernel.aliases[link.name]) for link in old]
    )
    assert state.endpoints == [ep] and [n.id for n in state.networks] == [net.id]
    again = await adopt(state=svc.shared.store.load(), topo=Topology(RangeAllocator),
                        kernel=kernel, owned_links=_links(svc), ns=FakeNamespaces(),
                        store=svc.shared.store)  # fmt: skip
    assert again.marks_refreshed == []  # marks with a record are left alone
