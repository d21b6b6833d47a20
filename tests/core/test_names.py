"""Names on a network (agent/core/names.py): the record table, lookups, validation, resolv.conf
(pure: case tables and hypothesis properties)."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import names, plan
from agent.core.bitmap import RangeAllocator
from agent.core.errors import InvalidArgument
from agent.core.model import Endpoint, Network
from agent.core.pools import DEFAULT_POOLS
from agent.core.topology import Topology

NET = "ab" * 32


def ep(n: int, *aliases: str, ip6: bool = False, network: str = NET) -> Endpoint:
    return Endpoint(
        id=f"{n:064x}", network_id=network, netns=f"/run/netns/c{n}", netns_key=f"4:{n}",
        ifname="eth0", host_ifname=f"na{n:013x}", ip=f"172.18.0.{n}", mac="02:42:ac:12:00:02",
        ip6=f"fd00::{n:x}" if ip6 else None, aliases=tuple(aliases),
    )  # fmt: skip


def test_name_and_aliases_answer_a_and_aaaa() -> None:
    table = names.build([ep(2, "web", "frontend", ip6=True), ep(3, "db")])
    assert names.lookup(table, "web", names.A) == names.Answer(True, names.A, ("172.18.0.2",))
    assert names.lookup(table, "frontend.", names.AAAA).records == ("fd00::2",)
    assert names.lookup(table, "db", names.A).records == ("172.18.0.3",)


@pytest.mark.parametrize("asked", ["WEB", "Web.", "web.", "wEb"])
def test_case_and_trailing_dot_do_not_matter(asked: str) -> None:
    table = names.build([ep(2, "web")])
    assert names.lookup(table, asked, names.A).records == ("172.18.0.2",)


def test_one_alias_on_several_endpoints_gives_several_records_in_join_order() -> None:
    table = names.build([ep(4, "c4", "cache"), ep(2, "c2", "cache"), ep(3, "c3")])
    assert names.lookup(table, "cache", names.A).records == ("172.18.0.4", "172.18.0.2")


def test_a_name_without_a_record_of_the_type_is_nodata_not_forwarded() -> None:
    table = names.build([ep(2, "web")])
    assert names.lookup(table, "web", names.AAAA) == names.Answer(True, names.AAAA, ())
    assert names.lookup(table, "web", 16) == names.Answer(True, 16, ())  # TXT


def test_other_names_are_forwarded() -> None:
    table = names.build([ep(2, "web")])
    assert names.lookup(table, "example.com.", names.A) == names.FORWARD
    assert names.lookup(table, "web.example.com", names.A) == names.FORWARD
    assert names.lookup(names.EMPTY, "web", names.A) == names.FORWARD


def test_ptr_of_each_address_names_the_first_name() -> None:
    table = names.build([ep(2, "web", "frontend", ip6=True)])
    v4 = ipaddress.ip_address("172.18.0.2").reverse_pointer
    v6 = ipaddress.ip_address("fd00::2").reverse_pointer
    assert names.lookup(table, v4.upper() + ".", names.PTR).records == ("web",)
    assert names.lookup(table, v6, names.PTR).records == ("web",)
    assert names.lookup(table, "3.0.18.172.in-addr.arpa", names.PTR) == names.FORWARD


def test_rotated_gives_each_record_the_lead_in_turn() -> None:
    found = names.Answer(True, names.A, ("a", "b", "c"))
    assert [names.rotated(found, k).records for k in range(4)] == [
        ("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c"),
    ]  # fmt: skip
    one = names.Answer(True, names.A, ("a",))
    assert names.rotated(one, 5) is one


def test_endpoints_without_names_add_nothing() -> None:
    assert names.build([ep(2)]) == names.EMPTY


@pytest.mark.parametrize(
    "name", ["web", "Web-1", "db_main", "a.b.c", "x" * 63, "web.", "1", ".".join(["a" * 63] * 3)]
)
def test_valid_names(name: str) -> None:
    assert names.validate_name(name) == name.lower().removesuffix(".")


@pytest.mark.parametrize(
    "name",
    ["", ".", "a..b", "-web", "web-", "we b", "x" * 64, "é", "a/b", "web..", "a." * 127 + "a"],
)
def test_invalid_names_are_refused(name: str) -> None:
    assert not names.is_valid_name(name)
    with pytest.raises(InvalidArgument, match="invalid DNS name"):
        names.validate_name(name)


def test_endpoint_names_put_the_name_first_once_each() -> None:
    assert names.endpoint_names("Web", ["db", "WEB", "db."]) == ("web", "db")
    assert names.endpoint_names(None, []) == ()
    with pytest.raises(InvalidArgument, match="at most"):
        names.endpoint_names(None, [f"n{i}" for i in range(names.MAX_NAMES + 1)])


def test_dns_is_on_for_user_networks_and_never_on_the_default_one() -> None:
    topo = Topology(RangeAllocator)

    def planned(spec: plan.NetworkSpec) -> Network:
        decided = plan.plan_network(
            spec, topo=topo, pools=DEFAULT_POOLS, routes=[], new_id=NET, random40=1, now=0.0
        )
        return decided.network

    assert names.dns_enabled(planned(plan.network_spec("n1")))
    assert not names.dns_enabled(planned(plan.network_spec("n1", {"dns": "false"})))
    default = planned(plan.NetworkSpec(name="bridge", is_default=True))
    assert not default.dns and not names.dns_enabled(default)
    # a default network stored before the field existed decodes with dns=True: still off
    assert not names.dns_enabled(msgspec.structs.replace(default, dns=True))


def test_records_stored_before_the_fields_existed_decode() -> None:
    old_net = b'{"id":"%s","name":"n","bridge":"br-x","subnet":"10.0.0.0/24","gateway":"10.0.0.1"}'
    assert msgspec.json.decode(old_net % NET.encode(), type=Network).dns is True
    body = msgspec.json.encode(ep(2, "web"))
    old = msgspec.json.decode(body)
    del old["aliases"]
    assert msgspec.json.decode(msgspec.json.encode(old), type=Endpoint).aliases == ()


def test_resolv_conf_and_its_parse() -> None:
    text = names.resolv_conf(["172.18.0.1", "fd00::1"])
    assert text == "nameserver 172.18.0.1\nnameserver fd00::1\n"
    assert names.parse_resolv_conf(text) == ["172.18.0.1", "fd00::1"]
    with pytest.raises(InvalidArgument, match="invalid DNS server"):
        names.resolv_conf(["dns.example"])
    host = "# made by hand\nsearch lan\nnameserver 10.0.0.53\nnameserver bogus\n"
    host += "nameserver fe80::1%eth0\n"
    assert names.parse_resolv_conf(host) == ["10.0.0.53", "fe80::1"]


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("10.0.0.53", ("10.0.0.53", 53)),
        ("10.0.0.53:5353", ("10.0.0.53", 5353)),
        ("fd00::53", ("fd00::53", 53)),
        ("[fd00::53]:5353", ("fd00::53", 5353)),
    ],
)
def test_upstreams(text: str, server: tuple[str, int]) -> None:
    assert names.parse_upstream(text) == server


@pytest.mark.parametrize("text", ["", "dns.example", "10.0.0.53:0", "10.0.0.53:x", "[fd00::1]x"])
def test_bad_upstreams(text: str) -> None:
    with pytest.raises(InvalidArgument):
        names.parse_upstream(text)


# -- properties ------------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,8}[a-z0-9_])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=3).map(".".join)


@given(st.lists(st.lists(NAME, max_size=3, unique=True), min_size=1, max_size=12))
def test_every_name_answers_exactly_its_endpoints_addresses(names_of: list[list[str]]) -> None:
    eps = [ep(i + 2, *aliases, ip6=i % 2 == 0) for i, aliases in enumerate(names_of)]
    table = names.build(eps)
    for name in {n for aliases in names_of for n in aliases}:
        having = [e for e in eps if name in e.aliases]
        for asked in (name, name.upper(), name + "."):
            assert names.lookup(table, asked, names.A).records == tuple(e.ip for e in having)
            six = tuple(e.ip6 for e in having if e.ip6)
            assert names.lookup(table, asked, names.AAAA).records == six
    for e in eps:
        ptr = names.lookup(table, names.reverse_name(e.ip), names.PTR)
        assert ptr.records == (e.aliases[:1] if e.aliases else ())
    # building is deterministic and does not depend on anything but the endpoints
    assert names.build(eps) == table


@given(st.text(max_size=80))
def test_any_text_is_a_valid_name_or_refused_with_our_error(text: str) -> None:
    try:
        got = names.validate_name(text)
    except InvalidArgument:
        assert not names.is_valid_name(text)
    else:
        assert names.is_valid_name(got) and got == got.lower() and not got.endswith(".")


@given(st.text(max_size=40))
def test_any_upstream_text_parses_or_raises_our_error(text: str) -> None:
    try:
        address, port = names.parse_upstream(text)
    except InvalidArgument:
        return
    assert ipaddress.ip_address(address) and 0 < port < 65536
