"""The core's decisions: the option table, specs, network planning (pure, no fakes needed)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import options, plan
from agent.core.bitmap import RangeAllocator
from agent.core.errors import Conflict, InvalidArgument
from agent.core.pools import DEFAULT_POOLS
from agent.core.topology import Topology

ID = "ab" * 32


@pytest.mark.parametrize(
    ("given", "fields"),
    [
        ({"icc": "false"}, {"icc": False}),
        ({"com.docker.network.bridge.enable_icc": "FALSE"}, {"icc": False}),
        ({"ip-masquerade": "0", "mtu": "1400"}, {"masquerade": False, "mtu": 1400}),
        ({"com.docker.network.driver.mtu": "9000", "mtu": "9000"}, {"mtu": 9000}),
        ({"com.docker.network.bridge.name": "br0"}, {"bridge": "br0"}),
        ({"com.docker.network.internal": "yes"}, {"internal": True}),
        ({"com.docker.network.enable_ipv6": "true"}, {"ipv6": True}),
        ({}, {}),
    ],
)
def test_options_by_short_or_docker_name(given: dict, fields: dict) -> None:
    assert options.parse(given) == fields


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"colour": "blue"}, "unknown network option"),
        ({"icc": "maybe"}, "expected true or false"),
        ({"mtu": "big"}, "expected an integer"),
        ({"mtu": "-1"}, "expected an integer"),
        ({"bridge": ""}, "empty value"),
        ({"mtu": "1400", "com.docker.network.driver.mtu": "1500"}, "disagree"),
    ],
)
def test_bad_options_are_invalid_arguments(given: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        options.parse(given)


@given(
    st.dictionaries(
        st.sampled_from(sorted(options.BY_KEY)) | st.text(max_size=40),
        st.sampled_from(["true", "No", "0", "1400", "br0", ""]) | st.text(max_size=10),
        max_size=4,
    )
)
def test_any_options_parse_or_raise_our_error(given: dict) -> None:
    """Parse, or raise InvalidArgument, never anything else; what parses is known keys only,
    each giving a value of its field's type."""
    try:
        fields = options.parse(given)
    except InvalidArgument:
        return
    assert set(given) <= options.BY_KEY.keys()
    kinds = {o.field: o.kind for o in options.OPTIONS}
    assert all(type(value) is kinds[field] for field, value in fields.items())


def test_every_option_sets_a_field_of_the_spec() -> None:
    fields = set(plan.NetworkSpec.__struct_fields__)
    assert {o.field for o in options.OPTIONS} <= fields
    for option in options.OPTIONS:  # the short name and every alias reach the same field
        for key in (option.name, *option.aliases):
            assert options.BY_KEY[key] is option


def test_network_spec_merges_options_with_fields() -> None:
    spec = plan.network_spec("n", {"icc": "false"}, internal=True, subnet="10.0.0.0/24")
    assert (spec.icc, spec.internal, spec.subnet) == (False, True, "10.0.0.0/24")
    assert plan.network_spec("n", {"internal": "true"}).internal
    with pytest.raises(InvalidArgument, match="contradicts"):
        plan.network_spec("n", {"internal": "false"}, internal=True)


def _topo() -> Topology:
    return Topology(RangeAllocator)


def _plan(topo: Topology, spec: plan.NetworkSpec, **kw) -> plan.NetworkPlan:
    args = {"topo": topo, "pools": DEFAULT_POOLS, "routes": [], "new_id": ID,
            "random40": 0x1234567890, "now": 1.0} | kw  # fmt: skip
    return plan.plan_network(spec, **args)


def test_plan_network_decides_without_changing_the_topology() -> None:
    topo = _topo()
    decided = _plan(topo, plan.NetworkSpec(name="v6", ipv6=True))
    net = decided.network
    assert (net.subnet, net.gateway, net.bridge) == ("172.17.0.0/16", "172.17.0.1", f"br-{ID[:12]}")
    assert decided.ula48 == ipaddress.IPv6Network("fd12:3456:7890::/48")
    assert net.subnet6 == "fd12:3456:7890::/64"
    assert topo.ula48 is None and topo.networks == {}  # the service applies it


def test_plan_network_skips_routes_but_not_the_networks_own_subnets() -> None:
    topo = _topo()
    routes = [ipaddress.IPv4Network("172.17.5.0/24"), ipaddress.IPv4Network("0.0.0.0/0")]
    net = _plan(topo, plan.NetworkSpec(name="a"), routes=routes).network
    assert net.subnet == "172.18.0.0/16"


def test_plan_network_refuses_taken_names_ids_and_bridges() -> None:
    topo = _topo()
    topo.add_network(_plan(topo, plan.NetworkSpec(name="a", bridge="br0")).network)
    with pytest.raises(Conflict, match="name"):
        _plan(topo, plan.NetworkSpec(name="a"), new_id="cd" * 32)
    with pytest.raises(Conflict, match="id"):
        _plan(topo, plan.NetworkSpec(name="b"))
    with pytest.raises(Conflict, match="bridge"):
        _plan(topo, plan.NetworkSpec(name="b", bridge="br0"), new_id="cd" * 32)
    with pytest.raises(InvalidArgument, match="network id"):
        _plan(topo, plan.NetworkSpec(name="b", id="XYZ"))
    with pytest.raises(InvalidArgument, match="MTU"):
        _plan(topo, plan.NetworkSpec(name="b", mtu=20), new_id="cd" * 32)
    given_id = "ef" * 32  # an engine's own id (Docker's NetworkID) is used as is
    assert _plan(topo, plan.NetworkSpec(name="c", id=given_id)).network.id == given_id


@pytest.mark.parametrize("name", ["x\n", "bad name", "", "-x", "x" * 65])
def test_network_names_are_checked_whole(name: str) -> None:
    with pytest.raises(InvalidArgument, match="network name"):
        _plan(_topo(), plan.NetworkSpec(name=name))
