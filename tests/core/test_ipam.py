"""Pools, subnet choice, user input validation, the address allocator and MAC helpers.

Docker facts come from reference/golden/docker_ipam_observations.txt (Docker 20.10, observed).
"""

from __future__ import annotations

import importlib
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.core import bitmap as pure_bitmap
from agent.core import pools as pools_mod
from agent.core.errors import Conflict, InvalidArgument, NotFound, PoolExhausted
from agent.core.ipam import (
    DEFAULT_POOLS,
    AddressAllocator,
    Pool,
    choose_subnet,
    mac_for,
    parse_pool,
    plan_subnet,
    validate_mac,
)

try:
    fast_bitmap: Any = importlib.import_module("_fast.bitmap")
except ImportError:  # the extension is optional
    fast_bitmap = None

RANGE_ALLOCATORS = [
    pytest.param(pure_bitmap.RangeAllocator, id="pure"),
    pytest.param(
        fast_bitmap.RangeAllocator if fast_bitmap else None,
        id="cython",
        marks=pytest.mark.skipif(fast_bitmap is None, reason="_fast.bitmap is not built"),
    ),
]

N = IPv4Network
A = IPv4Address


def plan(**kw: Any) -> tuple[IPv4Network, IPv4Address, IPv4Network | None]:
    args: dict[str, Any] = {
        "subnet": None,
        "gateway": None,
        "ip_range": None,
        "pools": DEFAULT_POOLS,
        "used": [],
        "avoid": [],
        "after": None,
    }
    return plan_subnet(**(args | kw))


# --- pools -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "base", "size"),
    [
        ("10.200.0.0/16:24", "10.200.0.0/16", 24),
        ("10.200.0.0/16", "10.200.0.0/16", 16),
        (" 192.168.0.0/16:20 ", "192.168.0.0/16", 20),
        ("10.0.0.0/8:8", "10.0.0.0/8", 8),
    ],
)
def test_parse_pool(text: str, base: str, size: int) -> None:
    assert parse_pool(text) == Pool(N(base), size)


@pytest.mark.parametrize(
    "text",
    ["", "x", "10.0.0.1/16:24", "10.0.0.0/16:8", "10.0.0.0/16:31", "10.0.0.0/16:", "10.0.0.0/16:a",
     "10.0.0.0/16:-4", "10.0.0.0/33", "fd00::/8:64", "10.0.0.0/16:24:1", "10.0.0.0/31"],
)  # fmt: skip
def test_parse_pool_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_pool(text)


def test_parse_pool_hints_the_canonical_base() -> None:
    with pytest.raises(InvalidArgument, match=r"did you mean 10\.0\.0\.0/16") as info:
        parse_pool("10.0.1.2/16:24")
    assert info.value.data["hint"] == "10.0.0.0/16"


def test_default_pools_are_dockers() -> None:
    assert len(DEFAULT_POOLS) == 16
    assert [str(p.base) for p in DEFAULT_POOLS[:15]] == [f"172.{n}.0.0/16" for n in range(17, 32)]
    assert all(p.size == 16 for p in DEFAULT_POOLS[:15])
    assert DEFAULT_POOLS[15] == Pool(N("192.168.0.0/16"), 20)
    assert sum(p.count for p in DEFAULT_POOLS) == 31


# --- choose_subnet ---------------------------------------------------------------------------


def docker_sequence() -> list[str]:
    return [f"172.{n}.0.0/16" for n in range(17, 32)] + [
        f"192.168.{16 * k}.0/20" for k in range(16)
    ]


def test_default_order_then_exhausted() -> None:
    """Like Docker: docker0, test1, net1..net29 take all 31 pools; the 32nd fails."""
    used: list[IPv4Network] = []
    after = None
    for expected in docker_sequence():
        after = choose_subnet(DEFAULT_POOLS, used, [], after)
        assert str(after) == expected
        used.append(after)
    with pytest.raises(PoolExhausted, match="non-overlapping"):
        choose_subnet(DEFAULT_POOLS, used, [], after)


def test_round_robin_continues_after_last_then_wraps() -> None:
    """Docker: s1..s5 got 172.25..172.29 while 172.19.. were free; after 192.168.240.0/20 the
    next network wrapped to 172.19.0.0/16."""
    used = [N(s) for s in docker_sequence()[:8]]  # 172.17 .. 172.24, last one allocated
    del used[2:6]  # 172.19 .. 172.22 removed again
    assert str(choose_subnet(DEFAULT_POOLS, used, [], N("172.24.0.0/16"))) == "172.25.0.0/16"
    used = [n for n in map(N, docker_sequence()) if n.prefixlen == 20] + [N("172.17.0.0/16")]
    got = choose_subnet(DEFAULT_POOLS, used, [], N("192.168.240.0/20"))
    assert str(got) == "172.18.0.0/16"


def test_after_outside_every_pool_starts_at_the_beginning() -> None:
    assert str(choose_subnet(DEFAULT_POOLS, [], [], N("10.9.0.0/24"))) == "172.17.0.0/16"


def test_after_that_is_not_a_candidate_skips_what_it_covers() -> None:
    pools = [parse_pool("10.0.0.0/16:24")]
    assert str(choose_subnet(pools, [], [], N("10.0.4.0/22"))) == "10.0.8.0/24"
    assert str(choose_subnet(pools, [], [], N("10.0.255.128/25"))) == "10.0.0.0/24"


@pytest.mark.parametrize(
    ("avoid", "expected"),
    [
        (["172.17.0.0/16"], "172.18.0.0/16"),
        (["172.17.5.0/24", "172.18.0.7/32"], "172.19.0.0/16"),
        (["172.16.0.0/12"], "192.168.0.0/20"),
        (["172.16.0.0/12", "192.168.0.0/19"], "192.168.32.0/20"),
        (["10.0.0.0/8", "fd00::/8"], "172.17.0.0/16"),
    ],
)
def test_host_routes_are_skipped(avoid: list[str], expected: str) -> None:
    avoid_nets = [ip_network(a) for a in avoid]
    assert str(choose_subnet(DEFAULT_POOLS, [], avoid_nets, None)) == expected


def test_used_smaller_and_larger_than_candidates() -> None:
    pools = [parse_pool("10.0.0.0/16:24")]
    assert str(choose_subnet(pools, [N("10.0.0.128/25")], [])) == "10.0.1.0/24"
    assert str(choose_subnet(pools, [N("10.0.0.0/20")], [])) == "10.0.16.0/24"
    with pytest.raises(PoolExhausted):
        choose_subnet(pools, [N("10.0.0.0/8")], [])
    with pytest.raises(PoolExhausted):
        choose_subnet([], [], [])


def test_slash8_split_24_with_5000_used_jumps_past_used_runs(monkeypatch) -> None:
    """Cost is counted in overlap look-ups (not timed): a used run is jumped over at once."""
    lookups = 0
    real = pools_mod.Intervals.overlap_end

    def counting(self, lo, hi):
        nonlocal lookups
        lookups += 1
        return real(self, lo, hi)

    monkeypatch.setattr(pools_mod.Intervals, "overlap_end", counting)
    pools = [parse_pool("10.0.0.0/8:24")]
    used = [N((0x0A000000 + k * 256, 24)) for k in range(5000)]
    scattered = [N((0x0A000000 + k * 256, 24)) for k in range(6000, 65536, 13)][:5000]
    assert str(choose_subnet(pools, used, [])) == "10.19.136.0/24"  # 5000 = 19 * 256 + 136
    assert str(choose_subnet(pools, used[::-1], [], used[-1])) == "10.19.136.0/24"
    assert str(choose_subnet(pools, used + scattered, [], used[10])) == "10.19.136.0/24"
    after = scattered[-1]
    got = choose_subnet(pools, used + scattered, [], after)
    assert got == N((int(after.network_address) + 256, 24))
    # Everything taken but the very last /24: found by jumping, not by walking.
    nearly = [N((0x0A000000 + k * 256, 24)) for k in range(65535)]
    assert str(choose_subnet(pools, nearly, [], nearly[100])) == "10.255.255.0/24"
    # walking candidate by candidate would take tens of thousands of look-ups
    assert lookups < 5000 // 13 + 50


def brute_force(pools: list[Pool], used: list[IPv4Network], after: IPv4Network | None) -> Any:
    """Enumerate every candidate; start after what `after` covers in the first pool holding it."""
    cands = [p.candidate(k) for p in pools for k in range(p.count)]
    start = 0
    pool = next((p for p in pools if after is not None and p.base.overlaps(after)), None)
    if pool is not None and after is not None:
        idx = [j for j, c in enumerate(cands) if c.subnet_of(pool.base)]
        later = (j for j in idx if cands[j].network_address > after.broadcast_address)
        start = next(later, idx[-1] + 1)
    for c in cands[start:] + cands[:start]:
        if not any(c.overlaps(u) for u in used):
            return c
    return None


NETS = st.builds(
    lambda addr, plen: ip_network((addr, plen), strict=False),
    st.integers(0x0A000000, 0x0A000FFF),
    st.integers(20, 30),
)


@settings(max_examples=300, deadline=None)
@given(used=st.lists(NETS, max_size=12), after=st.none() | NETS, split=st.sampled_from([26, 28]))
def test_choose_subnet_matches_brute_force(
    used: list[IPv4Network], after: IPv4Network | None, split: int
) -> None:
    pools = [parse_pool(f"10.0.4.0/22:{split}"), parse_pool("10.0.0.0/22:24")]
    expected = brute_force(pools, used, after)
    if expected is None:
        with pytest.raises(PoolExhausted):
            choose_subnet(pools, used, [], after)
    else:
        assert choose_subnet(pools, used[:6], used[6:], after) == expected


# --- plan_subnet -----------------------------------------------------------------------------


def test_plan_defaults() -> None:
    assert plan() == (N("172.17.0.0/16"), A("172.17.0.1"), None)
    assert plan(subnet="10.0.0.0/24") == (N("10.0.0.0/24"), A("10.0.0.1"), None)
    assert plan(subnet="10.10.0.0/24", gateway="10.10.0.254", ip_range="10.10.0.128/25") == (
        N("10.10.0.0/24"),
        A("10.10.0.254"),
        N("10.10.0.128/25"),
    )
    assert plan(subnet="10.0.0.0/30", ip_range="10.0.0.0/30")[2] == N("10.0.0.0/30")
    # A host route over the subnet does not stop an explicit subnet (Docker allows it).
    assert plan(subnet="10.0.0.0/24", avoid=[N("10.0.0.0/8")])[0] == N("10.0.0.0/24")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"subnet": "10.0.0.1/24"}, "did you mean 10.0.0.0/24"),
        ({"subnet": "banana"}, "invalid subnet"),
        ({"subnet": "10.0.0.0/33"}, "invalid subnet"),
        ({"subnet": ""}, "invalid subnet"),
        ({"subnet": "10.0.0.0/31"}, "too small"),
        ({"subnet": "10.0.0.0/32"}, "too small"),
        ({"subnet": "fd00::/64"}, "only IPv4"),
        ({"subnet": "10.0.0.0/24", "gateway": "10.0.1.1"}, "not inside the subnet"),
        ({"subnet": "10.0.0.0/24", "gateway": "10.0.0.0"}, "network or broadcast"),
        ({"subnet": "10.0.0.0/24", "gateway": "10.0.0.255"}, "network or broadcast"),
        ({"subnet": "10.0.0.0/24", "gateway": "10.0.0.x"}, "not an IP address"),
        ({"subnet": "10.0.0.0/24", "gateway": "::1"}, "not inside the subnet"),
        ({"subnet": "10.0.0.0/24", "ip_range": "10.0.1.0/25"}, "not inside the subnet"),
        ({"subnet": "10.0.0.0/24", "ip_range": "10.0.0.0/23"}, "not inside the subnet"),
        ({"subnet": "10.0.0.0/24", "ip_range": "10.0.0.129/25"}, "did you mean 10.0.0.128/25"),
        ({"subnet": "10.0.0.0/24", "ip_range": "fd00::/120"}, "not inside the subnet"),
        ({"gateway": "10.0.0.1"}, "needs an explicit subnet"),
        ({"ip_range": "10.0.0.0/25"}, "needs an explicit subnet"),
    ],
)
def test_plan_rejects(kw: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        plan(**kw)


def test_plan_overlap_is_a_conflict_naming_the_other_subnet() -> None:
    used = [N("172.17.0.0/16"), N("10.0.0.0/16")]
    with pytest.raises(Conflict, match=r"10\.0\.0\.0/16") as info:
        plan(subnet="10.0.5.0/24", used=used)
    assert info.value.data == {"subnet": "10.0.5.0/24", "overlaps": "10.0.0.0/16"}
    with pytest.raises(Conflict):
        plan(subnet="172.0.0.0/8", used=used)


def test_plan_exhausted() -> None:
    with pytest.raises(PoolExhausted):
        plan(used=[N("172.16.0.0/12"), N("192.168.0.0/16")])


# --- AddressAllocator ------------------------------------------------------------------------


@pytest.fixture(params=RANGE_ALLOCATORS)
def range_allocator(request: pytest.FixtureRequest) -> type:
    return request.param


def alloc(subnet: str, gw: str, rng: str | None = None, **kw: Any) -> AddressAllocator:
    return AddressAllocator(N(subnet), A(gw), N(rng) if rng else None, **kw)


def test_docker_first_addresses(range_allocator: type) -> None:
    a = alloc("172.18.0.0/16", "172.18.0.1", range_allocator=range_allocator)
    assert [str(a.allocate()) for _ in range(3)] == ["172.18.0.2", "172.18.0.3", "172.18.0.4"]
    b = alloc("10.10.0.0/24", "10.10.0.254", "10.10.0.128/25", range_allocator=range_allocator)
    assert str(b.allocate()) == "10.10.0.128"  # Docker gave c4 exactly this
    assert (b.used, b.free) == (1, 128 - 3)  # .254 gateway and .255 broadcast are in the range


def test_round_robin_after_release_and_wrap(range_allocator: type) -> None:
    a = alloc("10.0.0.0/29", "10.0.0.1", range_allocator=range_allocator)
    got = [a.allocate() for _ in range(3)]
    assert got == [A("10.0.0.2"), A("10.0.0.3"), A("10.0.0.4")]
    a.release(A("10.0.0.3"))
    assert a.allocate() == A("10.0.0.5")  # not the address just released
    assert a.allocate() == A("10.0.0.6")
    assert a.allocate() == A("10.0.0.3")  # wraps, skipping .7 broadcast, .0 network, .1 gw
    with pytest.raises(PoolExhausted, match="no free address"):
        a.allocate()
    assert (a.used, a.free) == (5, 0)


def test_slash30_holds_one_address(range_allocator: type) -> None:
    a = alloc("10.0.0.0/30", "10.0.0.1", range_allocator=range_allocator)
    assert a.free == 1
    assert a.allocate() == A("10.0.0.2")
    with pytest.raises(PoolExhausted):
        a.allocate()


@pytest.mark.parametrize(
    ("addr", "exc", "match"),
    [
        ("10.0.1.5", InvalidArgument, "not inside the subnet"),
        ("10.0.0.0", InvalidArgument, "reserved"),
        ("10.0.0.255", InvalidArgument, "reserved"),
        ("10.0.0.1", InvalidArgument, "reserved"),
        ("10.0.0.9", InvalidArgument, "reserved"),
        ("::5", InvalidArgument, "not inside the subnet"),
        ("10.0.0.5", Conflict, r"address 10\.0\.0\.5 is already in use on this network"),
    ],
)
def test_static_rejects(range_allocator: type, addr: str, exc: type, match: str) -> None:
    a = alloc("10.0.0.0/24", "10.0.0.1", reserved=[A("10.0.0.9")], range_allocator=range_allocator)
    a.allocate(A("10.0.0.5"))
    with pytest.raises(exc, match=match):
        a.allocate(ip_address(addr))  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        a.reserve(ip_address(addr))  # type: ignore[arg-type]


def test_static_outside_range_and_cursor_untouched(range_allocator: type) -> None:
    a = alloc("10.0.0.0/24", "10.0.0.1", "10.0.0.128/25", range_allocator=range_allocator)
    assert a.allocate(A("10.0.0.7")) == A("10.0.0.7")
    assert a.used == 0  # outside the dynamic range
    a.allocate(A("10.0.0.128"))
    assert (a.used, a.cursor) == (1, 128)
    assert a.allocate() == A("10.0.0.129")
    a.reserve(A("10.0.0.130"))
    assert a.allocate() == A("10.0.0.131")
    assert a.is_allocated(A("10.0.0.7")) and a.is_allocated(A("10.0.0.130"))
    assert not a.is_allocated(A("10.0.0.1")) and not a.is_allocated(A("10.0.9.1"))


def test_release_errors_and_identity(range_allocator: type) -> None:
    a = alloc("10.0.0.0/24", "10.0.0.1", range_allocator=range_allocator)
    for addr in ("10.0.0.5", "10.0.0.1", "10.0.0.0", "10.9.0.5"):
        with pytest.raises(NotFound, match="not allocated"):
            a.release(A(addr))
    ip = a.allocate()
    a.release(ip)
    assert (a.used, a.free, a.is_allocated(ip)) == (0, 253, False)
    with pytest.raises(NotFound):
        a.release(ip)
    assert a.allocate(ip) == ip


def test_cursor_survives_a_restart(range_allocator: type) -> None:
    a = alloc("10.0.0.0/24", "10.0.0.1", range_allocator=range_allocator)
    taken = [a.allocate() for _ in range(10)]
    a.release(taken[-1])
    b = alloc("10.0.0.0/24", "10.0.0.1", range_allocator=range_allocator)
    for ip in taken[:-1]:
        b.reserve(ip)
    b.set_cursor(a.cursor)
    assert b.allocate() == a.allocate() == A("10.0.0.12")
    b.set_cursor(256)  # the end of the range wraps to its start
    assert b.cursor == 0
    for bad in (-1, 257):
        with pytest.raises(InvalidArgument):
            b.set_cursor(bad)
    c = alloc("10.0.0.0/24", "10.0.0.1", "10.0.0.128/25", range_allocator=range_allocator)
    with pytest.raises(InvalidArgument):
        c.set_cursor(5)


def test_bad_construction() -> None:
    with pytest.raises(InvalidArgument):
        alloc("10.0.0.0/24", "10.0.1.1")
    with pytest.raises(InvalidArgument):
        alloc("10.0.0.0/24", "10.0.0.1", "10.0.1.0/25")
    with pytest.raises(InvalidArgument):
        alloc("10.0.0.0/24", "10.0.0.1", reserved=[A("10.0.1.1")])


@pytest.mark.parametrize("subnet", ["10.0.0.0/16", "10.0.0.0/8"])
def test_nearly_full(range_allocator: type, subnet: str) -> None:
    net = N(subnet)
    size = net.num_addresses
    a = AddressAllocator(net, net.network_address + 1, range_allocator=range_allocator)
    holes = {size // 3, size // 2 + 1, size - 2}
    step = 1 if size <= 1 << 16 else 4099  # the /8: fill a sparse grid plus a dense block
    pre = [i for i in range(2, size - 1, step) if i not in holes]
    if step > 1:
        pre += [i for i in range(size - 70_000, size - 1) if i not in holes and i % step != 2]
    base = int(net.network_address)
    for i in pre:
        a.reserve(A(base + i))
    if step == 1:
        assert a.free == len(holes)
        got = {int(a.allocate()) - base for _ in holes}
        assert got == holes
        with pytest.raises(PoolExhausted):
            a.allocate()
    else:
        a.set_cursor(size - 70_000)
        assert int(a.allocate()) - base == size - 2  # jumps over the dense block
        assert int(a.allocate()) - base == 3  # and wraps to the grid's first gap


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/reserve/release on a pure and (if built) a Cython allocator in lockstep."""

    def __init__(self) -> None:
        super().__init__()
        self.allocs: list[AddressAllocator] = []
        self.taken: set[IPv4Address] = set()

    @initialize(
        plen=st.integers(22, 30),
        gw_off=st.integers(1, 2),
        rng_plen=st.none() | st.integers(0, 3),
        rng_pick=st.integers(0, 7),
    )
    def make(self, plen: int, gw_off: int, rng_plen: int | None, rng_pick: int) -> None:
        self.net = N(f"10.1.0.0/{plen}")
        self.gw = self.net.network_address + gw_off
        self.rng = None
        if rng_plen is not None and plen + rng_plen <= 32:
            subs = list(self.net.subnets(prefixlen_diff=rng_plen))
            self.rng = subs[rng_pick % len(subs)]
        classes = [pure_bitmap.RangeAllocator]
        classes += [fast_bitmap.RangeAllocator] if fast_bitmap else []
        self.allocs = [
            AddressAllocator(self.net, self.gw, self.rng, range_allocator=c) for c in classes
        ]

    def _all(self, name: str, *args: Any) -> Any:
        results = []
        for a in self.allocs:
            try:
                results.append(getattr(a, name)(*args))
            except (InvalidArgument, Conflict, NotFound, PoolExhausted) as exc:
                results.append(type(exc))
        assert len(set(results)) == 1, results
        return results[0]

    @precondition(lambda self: self.allocs)
    @rule()
    def allocate(self) -> None:
        got = self._all("allocate")
        dyn = self.rng or self.net
        if got is PoolExhausted:
            assert self.allocs[0].free == 0
            return
        assert got not in self.taken
        assert got in dyn
        assert got not in (self.net.network_address, self.net.broadcast_address, self.gw)
        self.taken.add(got)

    @precondition(lambda self: self.allocs)
    @rule(off=st.integers(0, 1023), how=st.sampled_from(["allocate", "reserve"]))
    def static(self, off: int, how: str) -> None:
        addr = self.net.network_address + off % self.net.num_addresses
        got = self._all(how, addr)
        if addr in (self.net.network_address, self.net.broadcast_address, self.gw):
            assert got is InvalidArgument
        elif addr in self.taken:
            assert got is Conflict
        else:
            assert got in (addr, None)
            self.taken.add(addr)

    @precondition(lambda self: self.allocs)
    @rule(off=st.integers(0, 1023))
    def release(self, off: int) -> None:
        addr = self.net.network_address + off % self.net.num_addresses
        got = self._all("release", addr)
        assert (got is NotFound) == (addr not in self.taken)
        self.taken.discard(addr)

    @precondition(lambda self: self.taken)
    @rule(data=st.data())
    def release_taken(self, data: st.DataObject) -> None:
        addr = data.draw(st.sampled_from(sorted(self.taken)))
        assert self._all("release", addr) is None
        self.taken.discard(addr)

    @invariant()
    def counts(self) -> None:
        if not self.allocs:
            return
        dyn = self.rng or self.net
        fixed = {self.net.network_address, self.net.broadcast_address, self.gw}
        in_range = sum(ip in dyn for ip in self.taken)
        capacity = dyn.num_addresses - sum(ip in dyn for ip in fixed)
        for a in self.allocs:
            assert (a.used, a.free) == (in_range, capacity - in_range)
            assert a.cursor == self.allocs[0].cursor


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), plen=st.integers(24, 29))
def test_allocate_then_release_is_identity(n: int, plen: int) -> None:
    a = alloc(f"10.2.0.0/{plen}", "10.2.0.1")
    before = [a.is_allocated(ip) for ip in N(f"10.2.0.0/{plen}")]
    got = []
    for _ in range(min(n, a.free)):
        got.append(a.allocate())
    assert len(set(got)) == len(got)
    for ip in got:
        a.release(ip)
    assert [a.is_allocated(ip) for ip in N(f"10.2.0.0/{plen}")] == before
    assert a.used == 0


# --- MAC addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "mac"),
    [
        ("172.18.0.2", "02:42:ac:12:00:02"),
        ("10.10.0.128", "02:42:0a:0a:00:80"),
        ("192.168.255.254", "02:42:c0:a8:ff:fe"),
    ],
)
def test_mac_for(ip: str, mac: str) -> None:
    assert mac_for(A(ip)) == mac


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("02:42:AC:12:00:02", "02:42:ac:12:00:02"),
        ("02-42-ac-12-00-02", "02:42:ac:12:00:02"),
        ("  aa:bb:cc:dd:ee:ff ", "aa:bb:cc:dd:ee:ff"),
    ],
)
def test_validate_mac(text: str, canonical: str) -> None:
    assert validate_mac(text) == canonical


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "invalid MAC"),
        ("02:42:ac:12:00", "invalid MAC"),
        ("02:42:ac:12:00:02:03", "invalid MAC"),
        ("02:42:ac:12:00:g2", "invalid MAC"),
        ("02:42-ac:12:00:02", "invalid MAC"),
        ("2:42:ac:12:0:2", "invalid MAC"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "00:00:00:00:00:00"),
    ],
)
def test_validate_mac_rejects(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate_mac(text)
