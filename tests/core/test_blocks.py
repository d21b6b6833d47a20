"""The incremental taken-space index (`agent.core.blocks`) equals the from-scratch one."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.blocks import BlockSet, Either, span
from agent.core.pools import Intervals, Pool, choose_subnet


# CIDR blocks inside 10.0.0.0/20, prefixes /20../28: nested, equal, adjacent and disjoint ones
def _block(prefix: int, k: int) -> ipaddress.IPv4Network:
    start = 0x0A000000 + (k % (1 << (prefix - 20))) * (1 << (32 - prefix))
    return ipaddress.IPv4Network((start, prefix))


BLOCK = st.builds(_block, st.integers(20, 28), st.integers(0, 255))
OPS = st.lists(st.tuples(st.booleans(), BLOCK, st.integers(0, 50)), max_size=60)


def scratch(nets: list[ipaddress.IPv4Network]) -> Intervals:
    return Intervals(nets, 4)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_block_set_equals_intervals_after_any_adds_and_removes(ops) -> None:
    bs = BlockSet()
    present: list[ipaddress.IPv4Network] = []
    for add, net, pick in ops:
        if add or not present:
            bs.add(*span(net))
            present.append(net)
        else:
            gone = present.pop(pick % len(present))
            bs.remove(*span(gone))
        ref = scratch(present)
        assert (bs.starts, bs.ends) == (ref.starts, ref.ends)
        assert len(bs) == len(present)
    for probe in range(0x0A000000 - 16, 0x0A001000 + 16, 16):
        assert bs.overlap_end(probe, probe + 15) == scratch(present).overlap_end(probe, probe + 15)


@settings(max_examples=200, deadline=None)
@given(st.lists(BLOCK, max_size=30), st.lists(BLOCK, max_size=10), st.integers(0, 300))
def test_subnet_choice_with_the_index_equals_the_choice_from_lists(used, routes, after) -> None:
    pools = [Pool(ipaddress.IPv4Network("10.0.0.0/20"), 26)]
    last = pools[0].candidate(after % pools[0].count)
    taken = Either(BlockSet(map(span, used)), BlockSet(map(span, routes)))
    try:
        expected = choose_subnet(pools, used, routes, last)
    except Exception as exc:
        expected = type(exc)
    try:
        got = choose_subnet(pools, [], [], last, taken)
    except Exception as exc:
        got = type(exc)
    assert got == expected


def test_removing_a_nested_block_keeps_its_container_and_vice_versa() -> None:
    n = ipaddress.IPv4Network
    bs = BlockSet(map(span, [n("10.0.0.0/16"), n("10.0.1.0/24"), n("10.1.0.0/24")]))
    assert (bs.starts, bs.ends) == ([0x0A000000], [0x0A0100FF])  # adjacent: one run
    bs.remove(*span(n("10.0.1.0/24")))
    assert (bs.starts, bs.ends) == ([0x0A000000], [0x0A0100FF])
    bs.add(*span(n("10.0.1.0/24")))
    bs.remove(*span(n("10.0.0.0/16")))
    assert (bs.starts, bs.ends) == ([0x0A000100, 0x0A010000], [0x0A0001FF, 0x0A0100FF])


@settings(max_examples=100, deadline=None)
@given(OPS)
def test_topology_keeps_its_used_subnets_index_up_to_date(ops) -> None:
    from agent.core.bitmap import RangeAllocator
    from agent.core.model import Network
    from agent.core.topology import Topology

    topo = Topology(RangeAllocator)
    for i, (add, net, pick) in enumerate(ops):
        if net.prefixlen > 28:
            continue
        if add or not topo.networks:
            ident = f"{i:064x}"
            topo.add_network(Network(id=ident, name=f"n{i}", bridge=f"br{i}", subnet=str(net),
                                     gateway=str(net.network_address + 1)))  # fmt: skip
        else:
            topo.remove_network(sorted(topo.networks)[pick % len(topo.networks)])
        ref = Intervals(topo.subnets(), 4)
        assert (topo.used4.starts, topo.used4.ends) == (ref.starts, ref.ends)
