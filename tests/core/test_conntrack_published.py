"""`conntrack.published` finds each publishing network by bisection and agrees with a walk
over every network, for policies sorted by id (as `policy.build` makes them) or not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core.policy import FamilyPolicy, Forward, NetworkPolicy
from agent.firewall.conntrack import published

FWD = Forward("tcp", 8080, 80, "10.0.0.2")


def walked(family: FamilyPolicy) -> set[tuple[str, Forward]]:
    bridges = {n.id: n.bridge for n in family.networks}
    return {(bridges[k], f) for k, fs in family.forwards.items() if k in bridges for f in fs}


@given(
    st.lists(st.integers(0, 30), unique=True, max_size=12),
    st.lists(st.integers(0, 35), unique=True, max_size=5),
    st.booleans(),
)
def test_published_agrees_with_a_walk(ids: list[int], ported: list[int], keep_order: bool) -> None:
    nets = [NetworkPolicy(f"{i:04d}", f"br{i}", "10.0.0.0/24", False, True, True) for i in ids]
    if keep_order:
        nets.sort(key=lambda n: n.id)
    family = FamilyPolicy(4, tuple(nets), {f"{i:04d}": (FWD,) for i in ported})
    assert published(family) == walked(family)
