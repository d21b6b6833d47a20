"""IPv6 IPAM: ULA /48, subnet choice and validation, the sequential allocator (pure)."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import ipam6
from agent.core.errors import Conflict, InvalidArgument, NotFound, PoolExhausted

BASE = IPv6Network("fd12:3456:789a::/48")


def test_ula48_is_rfc4193() -> None:
    assert ipam6.ula48(0x123456789A) == BASE
    assert ipam6.ula48(0).subnet_of(IPv6Network("fd00::/8"))
    with pytest.raises(ValueError):
        ipam6.ula48(1 << 40)


def test_choose_subnet6_in_order_skipping_used() -> None:
    first = ipam6.choose_subnet6(BASE, [])
    assert first == IPv6Network("fd12:3456:789a::/64")
    used = [first, IPv6Network("fd12:3456:789a:1::/80"), IPv6Network("fd12:3456:789a:3::/64")]
    assert ipam6.choose_subnet6(BASE, used) == IPv6Network("fd12:3456:789a:2::/64")
    with pytest.raises(PoolExhausted):
        ipam6.choose_subnet6(BASE, [IPv6Network("fd12::/16")])


@pytest.mark.parametrize(
    ("subnet", "gateway", "error", "words"),
    [
        ("fd00::1/64", None, InvalidArgument, "host bits"),
        ("10.0.0.0/24", None, InvalidArgument, "not an IPv6"),
        ("fd00::/124", None, InvalidArgument, "/120"),
        ("fd00::/8", None, InvalidArgument, "/16"),
        ("nonsense", None, InvalidArgument, "expected a CIDR"),
        ("fd00:1::/64", "fd00:2::1", InvalidArgument, "not a host address"),
        ("fd00:1::/64", "fd00:1::", InvalidArgument, "not a host address"),
        ("fd00:1::/64", "10.0.0.1", InvalidArgument, "invalid IPv6 gateway"),
        ("fd12:3456:789a::/56", None, Conflict, "overlaps"),
        (None, "fd00::1", InvalidArgument, "explicit IPv6 subnet"),
    ],
)
def test_plan_subnet6_refuses(subnet, gateway, error, words) -> None:
    used = [IPv6Network("fd12:3456:789a::/64")]
    with pytest.raises(error, match=words):
        ipam6.plan_subnet6(subnet=subnet, gateway=gateway, base=BASE, used=used)


def test_plan_subnet6_defaults() -> None:
    net, gw = ipam6.plan_subnet6(subnet=None, gateway=None, base=BASE, used=[])
    assert (str(net), str(gw)) == ("fd12:3456:789a::/64", "fd12:3456:789a::1")
    net, gw = ipam6.plan_subnet6(subnet="fd00:9::/120", gateway="fd00:9::fe", base=BASE, used=[])
    assert (str(net), str(gw)) == ("fd00:9::/120", "fd00:9::fe")


def test_allocator6_sequence_static_release() -> None:
    net = IPv6Network("fd00::/64")
    a = ipam6.AddressAllocator6(net, IPv6Address("fd00::1"))
    assert [str(a.allocate()) for _ in range(2)] == ["fd00::2", "fd00::3"]
    assert str(a.allocate(IPv6Address("fd00::5"))) == "fd00::5"
    assert str(a.allocate()) == "fd00::4"
    assert str(a.allocate()) == "fd00::6"  # skips the static one
    a.release(IPv6Address("fd00::2"))
    assert str(a.allocate()) == "fd00::7"  # not reused before the cursor wraps
    with pytest.raises(Conflict):
        a.allocate(IPv6Address("fd00::3"))
    for bad in ("fd00::", "fd00::1", "fd01::2", "10.0.0.1"):
        with pytest.raises(InvalidArgument):
            a.allocate(ip_address(bad))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        a.release(IPv6Address("fd00::99"))


def test_allocator6_exhausts_a_120() -> None:
    a = ipam6.AddressAllocator6(IPv6Network("fd00::/120"), IPv6Address("fd00::1"))
    got = {a.allocate() for _ in range(254)}
    assert len(got) == 254 and IPv6Address("fd00::ff") in got
    with pytest.raises(PoolExhausted):
        a.allocate()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=120))
def test_allocator6_never_hands_out_twice(ops: list[tuple[bool, int]]) -> None:
    """Any sequence of allocate/release on a /120: no duplicates, reserved never handed out,
    PoolExhausted exactly when all 254 host addresses are taken."""
    net = IPv6Network("fd00::/120")
    a = ipam6.AddressAllocator6(net, IPv6Address("fd00::1"))
    held: set[IPv6Address] = set()
    for alloc, k in ops:
        if alloc:
            if len(held) == 254:
                with pytest.raises(PoolExhausted):
                    a.allocate()
                continue
            ip = a.allocate()
            assert ip in net and ip not in held and ip not in (net[0], net[1])
            held.add(ip)
        elif held:
            ip = sorted(held)[k % len(held)]
            a.release(ip)
            held.discard(ip)
        assert a.used == len(held)
