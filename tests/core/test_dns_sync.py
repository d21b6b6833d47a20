"""The DNS server's sockets follow network changes incrementally: after any sequence of
creates and removes (and failed binds) they are exactly those a full sync would make, and one
network's change looks at that network only (and at the ones whose bind failed)."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import names
from agent.core.bitmap import RangeAllocator
from agent.core.events import Event
from agent.core.model import Network
from agent.core.topology import Topology
from agent.dns import server
from agent.dns.upstream import Upstreams


class FakeListener:
    failing: set[str] = set()  # gateways whose bind fails

    def __init__(self, net_id: str, gateway: str, subnet: str) -> None:
        if gateway in self.failing:
            raise OSError(99, "cannot bind")
        self.net_id, self.gateway, self.closed = net_id, gateway, False

    def close(self) -> None:
        self.closed = True


def network(i: int, dns: bool, v6: bool) -> Network:
    return Network(id=f"{i:064x}", name=f"n{i}", bridge=f"br{i}", subnet=f"10.0.{i}.0/24",
                   gateway=f"10.0.{i}.1", dns=dns, ipv6=v6,
                   subnet6=f"fd00:{i:x}::/64" if v6 else None,
                   gateway6=f"fd00:{i:x}::1" if v6 else None)  # fmt: skip


def make(topo: Topology) -> server.DnsServer:
    srv = server.DnsServer(topo, Upstreams(fixed=[("10.99.0.2", 53)]))
    srv._bound, _ = trio.open_memory_channel[server.Listener](float("inf"))
    return srv


def event(action: str, net_id: str) -> Event:
    return Event(seq=1, time=0.0, type="network", action=action, id=net_id)


STEPS = st.lists(st.tuples(st.integers(0, 20), st.booleans(), st.booleans(), st.booleans()),
                 max_size=40)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(STEPS)
def test_incremental_sync_equals_a_full_sync(steps) -> None:
    orig = server.Listener
    server.Listener = FakeListener  # type: ignore[misc]
    try:
        topo = Topology(RangeAllocator)
        srv = make(topo)
        for i, dns, v6, fail in steps:
            FakeListener.failing = {f"10.0.{i}.1"} if fail else set()
            net = network(i, dns, v6)
            if net.id in topo.networks:
                topo.remove_network(net.id)
                srv.changed(event("removed", net.id))
            else:
                topo.add_network(net)
                srv.changed(event("created", net.id))
            FakeListener.failing = set()
            fresh = make(topo)
            fresh.sync()
            expected = set(fresh.listeners)
            failed = {k for k in expected if k not in srv.listeners}
            assert set(srv.listeners) <= expected
            assert all(k[0] in srv._unbound for k in failed)  # a failed bind waits for a retry
            srv.changed(event("created", "0" * 64))  # any change retries it
            assert set(srv.listeners) == expected
            assert not any(lst.closed for lst in srv.listeners.values())
    finally:
        server.Listener = orig  # type: ignore[misc]


def test_a_network_change_looks_at_that_network_only(monkeypatch) -> None:
    monkeypatch.setattr(server, "Listener", FakeListener)
    topo = Topology(RangeAllocator)
    srv = make(topo)
    for i in range(50):
        topo.add_network(network(i, True, False))
    srv.sync()
    assert len(srv.listeners) == 50
    looked: list[str] = []
    real = names.dns_enabled
    monkeypatch.setattr(names, "dns_enabled", lambda n: looked.append(n.id) or real(n))
    topo.add_network(network(50, True, False))
    srv.changed(event("created", network(50, True, False).id))
    topo.remove_network(network(3, True, False).id)
    srv.changed(event("removed", network(3, True, False).id))
    assert (
        len(srv.listeners) == 50 and (network(3, True, False).id, "10.0.3.1") not in srv.listeners
    )
    assert len(looked) <= 1
