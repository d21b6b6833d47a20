"""Names through the service, with the shells' fakes: the DNS server's records follow every
connect and disconnect at once (the bus's synchronous listener), `run` writes resolv.conf,
events carry the names, bad names change nothing."""

from __future__ import annotations

import dns.message
import pytest

from agent.core.errors import InvalidArgument
from agent.core.plan import EndpointSpec, NetworkSpec, network_spec
from agent.dns import wire
from agent.dns.server import DnsServer
from agent.dns.upstream import Upstreams
from agent.service import Service


def answers(srv: DnsServer, net_id: str, name: str) -> list[str] | None:
    """The addresses the server answers for `name` on the network; None: forwarded."""
    reply = srv.decide(net_id, wire.parse(dns.message.make_query(name, "A").to_wire()))
    if reply is None:
        return None
    return sorted(str(r) for rrset in dns.message.from_wire(reply).answer for r in rrset)


@pytest.fixture
def dns_server(svc: Service) -> DnsServer:
    srv = DnsServer(svc.topo, Upstreams(fixed=[("10.99.0.2", 53)]))
    svc.shared.bus.listeners.append(srv.changed)
    return srv


async def test_records_follow_connect_and_disconnect_without_restart(
    svc: Service, dns_server: DnsServer
) -> None:
    net = await svc.networks.create(NetworkSpec(name="n1"))
    assert answers(dns_server, net.id, "db") is None  # not ours yet: forwarded (and cached
    # nothing, so the connect below needs no cache flush... which the next lines check anyway)
    ep = await svc.endpoints.connect(
        EndpointSpec(network="n1", netns="ok-a", aliases=("db", "Primary"))
    )
    assert answers(dns_server, net.id, "db") == [ep.ip]
    assert answers(dns_server, net.id, "PRIMARY.") == [ep.ip]
    other = await svc.endpoints.connect(EndpointSpec(network="n1", netns="ok-b", aliases=("db",)))
    assert answers(dns_server, net.id, "db") == sorted([ep.ip, other.ip])
    await svc.endpoints.disconnect("n1", "ok-a")
    assert answers(dns_server, net.id, "db") == [other.ip]
    assert answers(dns_server, net.id, "primary") is None


async def test_names_are_per_network(svc: Service, dns_server: DnsServer) -> None:
    n1 = await svc.networks.create(NetworkSpec(name="n1"))
    n2 = await svc.networks.create(NetworkSpec(name="n2"))
    await svc.endpoints.connect(EndpointSpec(network="n1", netns="ok-a", aliases=("web",)))
    assert answers(dns_server, n1.id, "web") is not None
    assert answers(dns_server, n2.id, "web") is None


async def test_bad_alias_changes_nothing(svc: Service) -> None:
    await svc.networks.create(NetworkSpec(name="n1"))
    with pytest.raises(InvalidArgument, match="invalid DNS name"):
        await svc.endpoints.connect(EndpointSpec(network="n1", netns="ok-a", aliases=("a..b",)))
    assert not svc.topo.endpoints
    assert not svc.shared.kernel.veths


async def test_run_names_the_endpoint_and_writes_resolv_conf(svc: Service) -> None:
    await svc.networks.create(NetworkSpec(name="bridge", is_default=True))
    net = await svc.networks.create(NetworkSpec(name="n1"))
    ep = await svc.sandboxes.run("ok-web", EndpointSpec(network="n1", aliases=("www",)))
    assert ep.aliases == ("ok-web", "www")
    ns = svc.shared.ns
    assert ns.resolv["ok-web"] == f"nameserver {net.gateway}\n"
    named = await svc.sandboxes.run("ok-x", EndpointSpec(network="n1", name="api"), ["9.9.9.9"])
    assert named.aliases == ("api",)
    assert ns.resolv["ok-x"] == "nameserver 9.9.9.9\n"
    # the default network has no DNS: the namespace keeps the host's resolv.conf
    await svc.sandboxes.run("ok-plain", EndpointSpec(network="bridge"))
    assert "ok-plain" not in ns.resolv
    await svc.sandboxes.remove("ok-web")
    assert "ok-web" not in ns.resolv


async def test_run_without_dns_on_the_network_writes_nothing(svc: Service) -> None:
    await svc.networks.create(network_spec("quiet", {"dns": "false"}))
    await svc.sandboxes.run("ok-q", EndpointSpec(network="quiet"))
    assert "ok-q" not in svc.shared.ns.resolv


async def test_run_with_a_bad_dns_server_or_name_creates_nothing(svc: Service) -> None:
    await svc.networks.create(NetworkSpec(name="n1"))
    with pytest.raises(InvalidArgument, match="invalid DNS server"):
        await svc.sandboxes.run("ok-a", EndpointSpec(network="n1"), ["not-an-ip"])
    with pytest.raises(InvalidArgument, match="invalid DNS name"):
        await svc.sandboxes.run("ok-a", EndpointSpec(network="n1", name="-bad"))
    assert not svc.shared.ns.named and not svc.shared.ns.resolv and not svc.topo.sandboxes


async def test_events_carry_names(svc: Service) -> None:
    await svc.networks.create(NetworkSpec(name="n1"))
    seen = []
    svc.shared.bus.listeners.append(seen.append)
    await svc.endpoints.connect(EndpointSpec(network="n1", netns="ok-a", aliases=("a1", "a2")))
    await svc.endpoints.disconnect("n1", "ok-a")
    assert [(e.action, e.attributes["names"]) for e in seen] == [
        ("connected", "a1,a2"),
        ("disconnected", "a1,a2"),
    ]
