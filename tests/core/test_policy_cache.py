"""`policy.build` with its per-network cache equals the build from scratch after any sequence
of networks added, removed and replaced (same id, other options)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import policy
from agent.core.model import Network

STEPS = st.lists(
    st.tuples(st.integers(0, 15), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    max_size=40,
)


def network(i: int, internal: bool, icc: bool, v6: bool) -> Network:
    return Network(id=f"{i:064x}", name=f"n{i}", bridge=f"br{i}", subnet=f"10.0.{i}.0/24",
                   gateway=f"10.0.{i}.1", internal=internal, icc=icc, ipv6=v6,
                   subnet6=f"fd00:{i:x}::/64" if v6 else None,
                   gateway6=f"fd00:{i:x}::1" if v6 else None)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_cached_build_equals_build_from_scratch(steps) -> None:
    cache: dict[str, policy.Parts] = {}
    nets: dict[str, Network] = {}
    for i, remove, internal, icc, v6 in steps:
        net = network(i, internal, icc, v6)
        if remove and net.id in nets:
            del nets[net.id]
        else:
            nets[net.id] = net  # new, or the same id with other options
        got = policy.build(list(nets.values()), (), cache)
        assert got == policy.build(list(nets.values()))
        assert set(cache) == set(nets)
