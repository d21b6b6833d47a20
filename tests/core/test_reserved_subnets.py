"""Issue 17 defect 6: reserved, loopback, multicast, broadcast, link-local and "this network"
subnets are refused for networks (IPv4 and IPv6), for --subnet, --ip-range and --pool alike.

The oracle here is written out independently of `agent.core.pools.RESERVED` (integer spans of
the RFC 6890 blocks), so a block missing from the table is caught.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import ipam6
from agent.core.errors import InvalidArgument
from agent.core.ipam import DEFAULT_POOLS, parse_pool, plan_subnet
from agent.core.pools import MAX_PREFIX_V4

V4_SPANS = [  # (first, last) as integers
    (0x00000000, 0x00FFFFFF),  # 0.0.0.0/8 "this network"
    (0x7F000000, 0x7FFFFFFF),  # 127.0.0.0/8 loopback
    (0xA9FE0000, 0xA9FEFFFF),  # 169.254.0.0/16 link-local
    (0xE0000000, 0xFFFFFFFF),  # 224.0.0.0/4 multicast + 240.0.0.0/4 incl. 255.255.255.255
]
V6_SPANS = [
    (0, (1 << 120) - 1),  # ::/8 (::, ::1, ::ffff:0:0/96 ...)
    (0xFE80 << 112, (0xFEC0 << 112) - 1),  # fe80::/10 link-local
    (0xFEC0 << 112, (0xFF00 << 112) - 1),  # fec0::/10 site-local (deprecated)
    (0xFF00 << 112, (1 << 128) - 1),  # ff00::/8 multicast
]


def _reserved(net: IPv4Network | IPv6Network) -> bool:
    lo, hi = int(net.network_address), int(net.broadcast_address)
    spans = V4_SPANS if net.version == 4 else V6_SPANS
    return any(lo <= b and a <= hi for a, b in spans)


def _plan(subnet: str, **kw: str) -> tuple:
    return plan_subnet(
        subnet=subnet,
        gateway=kw.get("gateway"),
        ip_range=kw.get("ip_range"),
        pools=DEFAULT_POOLS,
        used=[],
        avoid=[],
        after=None,
    )


@pytest.mark.parametrize(
    ("subnet", "words"),
    [
        ("0.0.0.0/8", '"this network"'),
        ("0.0.0.0/0", '"this network"'),
        ("127.0.0.0/8", "loopback"),
        ("127.1.2.0/24", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("239.255.255.0/24", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.0/24", "255.255.255.255"),
        ("255.255.255.252/30", "broadcast"),
    ],
)
def test_reserved_ipv4_subnets_are_refused(subnet: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match="not usable") as info:
        _plan(subnet)
    assert words in info.value.message
    assert info.value.data["value"] == subnet


@pytest.mark.parametrize(
    "subnet",
    ["::/64", "::1/128", "::ffff:0:0/96", "fe80::/64", "fec0::/64", "ff00::/16", "ff02::/64"],
)
def test_reserved_ipv6_subnets_are_refused(subnet: str) -> None:
    net = ip_network(subnet)
    if net.prefixlen > ipam6.MAX_PREFIX_V6:  # too long to be a network at all: also refused
        with pytest.raises(InvalidArgument):
            ipam6.parse_subnet6(subnet)
        return
    with pytest.raises(InvalidArgument, match="not usable"):
        ipam6.plan_subnet6(subnet=subnet, gateway=None, base=IPv6Network("fd00::/48"), used=[])


def test_reserved_ip_range_and_pool_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"ip range 127\.0\.0\.0/25 is not usable.*loopback"):
        _plan("10.0.0.0/24", ip_range="127.0.0.0/25")
    for pool in ("127.0.0.0/8:24", "224.0.0.0/8", "0.0.0.0/0:24", "169.254.0.0/16:24"):
        with pytest.raises(InvalidArgument, match=r"pool .* is not usable"):
            parse_pool(pool)


def test_ordinary_subnets_still_pass() -> None:
    for subnet in ("10.0.0.0/8", "172.16.0.0/12", "192.168.1.0/24", "100.64.0.0/10", "1.0.0.0/8"):
        assert str(_plan(subnet)[0]) == subnet
    for subnet in ("fd00:1::/64", "2001:db8::/64", "2a00::/16"):
        net, _ = ipam6.plan_subnet6(
            subnet=subnet, gateway=None, base=IPv6Network("fd::/48"), used=[]
        )
        assert str(net) == subnet


@settings(max_examples=400, deadline=None)
@given(st.integers(0, (1 << 32) - 1), st.integers(0, MAX_PREFIX_V4))
def test_ipv4_refused_exactly_when_overlapping_a_reserved_block(addr: int, plen: int) -> None:
    net = IPv4Network((addr, plen), strict=False)
    if _reserved(net):
        with pytest.raises(InvalidArgument, match="not usable"):
            _plan(str(net))
    else:
        assert _plan(str(net))[0] == net


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.integers(0, (1 << 128) - 1),
        st.sampled_from([0, 1, 0xFE80 << 112, 0xFEC0 << 112, 0xFF00 << 112, 0xFFFF << 32]),
    ),
    st.integers(ipam6.MIN_PREFIX_V6, ipam6.MAX_PREFIX_V6),
)
def test_ipv6_refused_exactly_when_overlapping_a_reserved_block(addr: int, plen: int) -> None:
    net = IPv6Network((addr, plen), strict=False)
    plan = lambda: ipam6.plan_subnet6(  # noqa: E731
        subnet=str(net), gateway=None, base=IPv6Network("fd00::/48"), used=[]
    )
    if _reserved(net):
        with pytest.raises(InvalidArgument, match="not usable"):
            plan()
    else:
        assert plan()[0] == net
