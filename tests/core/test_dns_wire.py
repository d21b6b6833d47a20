"""agent/dns/wire.py and the server's decisions, checked with dnspython as the independent
reader (no sockets): answers, NODATA, errors, truncation, garbage."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.core import names
from agent.core.bitmap import RangeAllocator
from agent.core.model import Endpoint, Network
from agent.core.topology import Topology
from agent.dns import wire
from agent.dns.server import DnsServer
from agent.dns.upstream import Upstreams

NET = "ab" * 32


def query(name: str, rtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rtype, **kw).to_wire()  # type: ignore[arg-type]


def server(*aliases_of: tuple[str, ...]) -> DnsServer:
    topo = Topology(RangeAllocator)
    topo.add_network(
        Network(id=NET, name="n1", bridge="br-x", subnet="172.18.0.0/16", gateway="172.18.0.1")
    )
    for i, aliases in enumerate(aliases_of, start=2):
        ep = Endpoint(
            id=f"{i:064x}", network_id=NET, netns=f"/run/netns/c{i}", netns_key=f"4:{i}",
            ifname="eth0", host_ifname=f"na{i:013x}", ip=f"172.18.0.{i}",
            mac="02:42:ac:12:00:02", aliases=aliases,
        )  # fmt: skip
        topo.add_endpoint(ep)
    return DnsServer(topo, Upstreams(fixed=[("10.99.0.2", 53)]))


def ask(srv: DnsServer, data: bytes) -> dns.message.Message | None:
    reply = srv.decide(NET, wire.parse(data))
    return None if reply is None else dns.message.from_wire(reply)


def test_a_local_name_is_answered_authoritatively_with_the_query_id_and_question() -> None:
    data = query("WEB.", "A")
    got = ask(server(("web",)), data)
    assert got is not None
    assert got.id == dns.message.from_wire(data).id
    assert got.flags & dns.flags.QR and got.flags & dns.flags.AA and got.flags & dns.flags.RD
    assert str(got.question[0].name) == "WEB."
    assert got.rcode() == dns.rcode.NOERROR
    assert [str(r) for rrset in got.answer for r in rrset] == ["172.18.0.2"]
    assert got.answer[0].ttl == names.TTL


def test_several_endpoints_with_one_alias_give_several_records_round_robin() -> None:
    srv = server(("c2", "db"), ("c3", "db"), ("c4", "db"))
    firsts = []
    for _ in range(3):
        got = ask(srv, query("db", "A"))
        assert got is not None
        addresses = [str(r) for r in got.answer[0]]
        assert sorted(addresses) == ["172.18.0.2", "172.18.0.3", "172.18.0.4"]
        firsts.append(addresses[0])
    assert sorted(firsts) == ["172.18.0.2", "172.18.0.3", "172.18.0.4"]  # each leads once


def test_udp_answers_are_cached_with_every_round_robin_order() -> None:
    srv = server(("c2", "db"), ("c3", "db"), ("c4", "web"))
    lst = type("L", (), {"net_id": NET})()
    data = query("db")
    first = srv._udp_answer(lst, data, None, None)  # type: ignore[arg-type]
    assert first is not None
    cached = srv._cache[NET][data[2:]]
    assert len(cached) == 2 and first[2:] in cached
    single = query("web")
    srv._udp_answer(lst, single, None, None)  # type: ignore[arg-type]
    assert len(srv._cache[NET][single[2:]]) == 1


def test_ptr_and_nodata() -> None:
    srv = server(("web",))
    got = ask(srv, query("2.0.18.172.in-addr.arpa.", "PTR"))
    assert got is not None and [str(r) for r in got.answer[0]] == ["web."]
    nodata = ask(srv, query("web", "AAAA"))
    assert nodata is not None and nodata.rcode() == dns.rcode.NOERROR and not nodata.answer


def test_other_names_are_forwarded_and_odd_queries_get_errors() -> None:
    srv = server(("web",))
    assert ask(srv, query("example.com", "A")) is None
    msg = dns.message.make_query("web", "A")
    msg.set_opcode(dns.opcode.NOTIFY)
    got = ask(srv, msg.to_wire())
    assert got is not None and got.rcode() == dns.rcode.NOTIMP and not got.answer


def test_edns_size_and_truncation() -> None:
    many = server(*((f"c{i}", "big") for i in range(2, 60)))
    plain = wire.parse(query("big", "A"))
    edns = wire.parse(query("big", "A", use_edns=0, payload=4096))
    assert wire.udp_limit(plain) == wire.UDP_PLAIN
    assert wire.udp_limit(edns) == wire.UDP_MAX  # capped
    full = many.decide(NET, plain)
    assert full is not None and len(full) > wire.UDP_PLAIN  # 58 records do not fit in 512
    cut = dns.message.from_wire(wire.truncated(plain))
    assert cut.flags & dns.flags.TC and not cut.answer and cut.id == plain.header.id


def test_responses_and_short_packets_are_not_queries() -> None:
    response = dns.message.make_response(dns.message.make_query("web", "A")).to_wire()
    assert not wire.looks_like_query(response)
    assert not wire.looks_like_query(b"\x00" * 11)
    assert wire.looks_like_query(query("web"))


@given(st.binary(max_size=600))
def test_garbage_parses_or_raises_wire_error_only(data: bytes) -> None:
    try:
        parsed = wire.parse(data)
    except wire.WireError:
        return
    # what parses is answered without raising anything, and never larger than a local answer
    srv = server(("web",))
    reply = srv.decide(NET, parsed)
    assert reply is None or isinstance(reply, bytes)


@pytest.mark.parametrize("name", ["web", "WEB.", "db"])
def test_answers_and_cache_agree(name: str) -> None:
    """What the UDP path caches is what the table answers, the query's id aside."""
    srv = server(("web", "db"))
    lst = type("L", (), {"net_id": NET})()
    first = query(name)
    got = srv._udp_answer(lst, first, None, None)  # type: ignore[arg-type]
    assert got is not None and got[:2] == first[:2]
    assert srv._cache[NET][first[2:]] == (got[2:],)
    assert srv.decide(NET, wire.parse(first)) == got


def test_upstreams_follow_resolv_conf_and_the_override_wins(tmp_path, monkeypatch) -> None:
    from agent.dns import upstream

    monkeypatch.setattr(upstream, "RECHECK", 0.0)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.0.0.53\n")
    ups = upstream.Upstreams(path=str(conf))
    assert ups.servers() == [("10.0.0.53", 53)]
    conf.write_text("search lan\nnameserver 10.0.0.54\nnameserver fd00::53\n")
    assert ups.servers() == [("10.0.0.54", 53), ("fd00::53", 53)]
    conf.unlink()
    assert ups.servers() == []
    fixed = upstream.Upstreams([("192.0.2.1", 5353)], path=str(tmp_path / "none"))
    assert fixed.servers() == [("192.0.2.1", 5353)]


class _Spawned:
    """Stands for the listener's nursery: records what would be forwarded."""

    def __init__(self) -> None:
        self.started: list[tuple[object, ...]] = []

    def start_soon(self, fn: object, *args: object) -> None:
        self.started.append(args)


@given(st.binary(max_size=700) | st.builds(lambda q, tail: q + tail, st.sampled_from(
    [query("web"), query("example.com"), query("2.0.18.172.in-addr.arpa", "PTR")]
), st.binary(max_size=40)))  # fmt: skip
@example(dns.message.make_response(dns.message.make_query("web", "A")).to_wire())  # no loops
@example(query("web") + b"\x00" * 5000)  # oversized
def test_any_datagram_is_answered_dropped_or_forwarded_never_raises(data: bytes) -> None:
    srv = server(("web",))
    lst = type("L", (), {"net_id": NET})()
    spawned = _Spawned()
    reply = srv._udp_answer(lst, data, ("172.18.0.9", 5353), spawned)  # type: ignore[arg-type]
    try:
        parsed = wire.parse(data)
    except wire.WireError:
        assert reply is None and not spawned.started  # garbage: nothing at all
        return
    if not wire.looks_like_query(data) or len(data) > 4096:
        assert reply is None and not spawned.started
    elif reply is None:
        assert len(spawned.started) == 1  # forwarded, as received
        assert spawned.started[0][1] == data
    else:
        got = dns.message.from_wire(reply)  # dnspython reads what we answer
        assert got.id == parsed.header.id and got.flags & dns.flags.QR
        if got.rcode() != dns.rcode.NOERROR:  # an error is never larger than what was sent
            assert len(reply) <= len(data) + 11  # (+ an OPT record if the query had one)
