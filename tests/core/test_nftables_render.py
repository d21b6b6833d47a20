"""The nftables renderer and scripts, pure: case tables and properties (no kernel).

`simulate` plays a script's commands on a `State` the way nf_tables would (the subset the
backend writes), so "diff then apply gives the new state" is checked for any two topologies;
tests/shell/test_nftables.py checks the same scripts against the real kernel.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import naming, policy
from agent.core.model import Endpoint, Network, PortMapping
from agent.firewall.nftables import render, script


def net(i: int, **options: object) -> Network:
    ident = f"{i:012x}" + "ef" * 26
    return Network(
        id=ident,
        name=f"n{i}",
        bridge=naming.bridge_name(ident),
        subnet=f"10.{i // 256}.{i % 256}.0/24",
        gateway=f"10.{i // 256}.{i % 256}.1",
        ipv6=i % 2 == 0,
        subnet6=f"fd00:0:0:{i:x}::/64" if i % 2 == 0 else None,
        gateway6=f"fd00:0:0:{i:x}::1" if i % 2 == 0 else None,
        **options,
    )


def endpoint(n: Network, host: int, *ports: tuple[str, int, int]) -> Endpoint:
    base = n.subnet.rsplit(".", 1)[0]
    return Endpoint(
        id=f"{host:08x}".ljust(64, "0") + n.id[:0],
        network_id=n.id,
        netns="/run/netns/c",
        netns_key="1:1",
        ifname="eth0",
        host_ifname="na0",
        ip=f"{base}.{host}",
        ip6=f"{n.subnet6.split('/')[0]}{host:x}" if n.subnet6 else None,
        mac="02:42:00:00:00:02",
        ports=tuple(PortMapping(protocol=p, host_port=h, container_port=c) for p, h, c in ports),
    )


def simulate(state: render.State, lines: list[str]) -> render.State:
    """The state after nf_tables runs `lines` (the commands `script` writes)."""
    chains = {k: list(v) for k, v in state.chains.items()}
    elements = {k: set(v) for k, v in state.elements.items()}
    for line in lines:
        verb, _, rest = line.partition(f" {script.PREFIX} ")
        name, _, body = rest.partition(" ")
        if line == f"add table {script.PREFIX}":
            continue
        if verb == "add chain":
            chains.setdefault(name, [])  # `add` of an existing chain changes nothing
        elif verb in ("add set", "add map"):
            elements.setdefault(name, set())
        elif verb in ("flush set", "flush map"):
            elements[name] = set()
        elif verb == "flush chain":
            chains[name] = []
        elif verb == "delete chain":
            assert not chains.pop(name), f"deleting non-empty chain {name}"
        elif verb == "add rule":
            chains[name].append(body)
        elif verb in ("add element", "delete element"):
            items = body.strip("{} ").split(", ")
            target = elements.setdefault(name, set())
            if verb == "add element":
                keys = {i.split(" : ")[0] for i in items}
                assert not keys & {e.split(" : ")[0] for e in target}, f"{name}: key exists"
                target.update(items)
            else:
                gone = {e for e in target if e.split(" : ")[0] in items}
                assert len(gone) == len(items), f"{name}: deleting missing elements"
                target -= gone
        else:
            raise AssertionError(f"unexpected command {line!r}")
    for name, chain in chains.items():
        for rule in chain:
            for word in rule.split():
                if word.startswith("@"):
                    assert word[1:] in render.SETS, f"{name} names a missing set"
    for name, items in elements.items():
        for item in items:
            if " : goto " in item or " : jump " in item:
                assert item.rsplit(" ", 1)[1] in chains, f"{name}: {item} names a missing chain"
    chains.pop(render.USER, None)
    return render.State(
        {k: tuple(v) for k, v in chains.items()}, {k: frozenset(v) for k, v in elements.items()}
    )


topologies = st.lists(
    st.tuples(
        st.integers(1, 40),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 3)), max_size=3),
    ),
    max_size=8,
    unique_by=lambda t: t[0],
)


def build(topology: list[tuple[int, bool, bool, bool, list[tuple[str, int]]]]) -> policy.Policy:
    nets, eps = [], []
    for i, internal, icc, masq, ports in topology:
        n = net(i, internal=internal, icc=icc, masquerade=masq)
        nets.append(n)
        # host ports unique per network (the service refuses collisions)
        specs = sorted({(p, 10000 + i * 10 + k, 80 + k) for p, k in ports})
        if specs:
            eps.append(endpoint(n, 2, *specs))
    return policy.build(nets, eps)


@settings(max_examples=150, deadline=None)
@given(topologies, topologies)
def test_a_diff_applied_gives_the_new_state(a: list, b: list) -> None:
    old, new = render.render(build(a)), render.render(build(b))
    base = simulate(render.State(), script.full(old))
    assert base == old
    assert simulate(base, script.diff(old, new)) == new
    assert script.diff(new, new) == []


@settings(max_examples=100, deadline=None)
@given(topologies)
def test_a_listing_parses_back_and_render_is_deterministic(topology: list) -> None:
    state = render.render(build(topology))
    assert render.render(build(list(reversed(topology)))) == state
    seen = script.parse_listing(script.listing(state))
    assert seen.state() == state
    assert script.drift(seen, state) == []


def test_a_packet_and_a_transaction_cost_the_same_at_one_and_at_500_networks() -> None:
    """Networks are elements: the chains are the same whatever the topology, and a network
    create is a handful of element additions (no chain: libnftables lists every chain of the
    table before each transaction)."""
    one = render.render(policy.build([net(1)]))
    many = render.render(policy.build([net(i) for i in range(1, 501)]))
    assert one.chains == many.chains == render.CHAINS
    assert len(many.elements["bridges"]) == 500
    more = render.render(policy.build([net(i) for i in range(1, 502)]))
    assert script.diff(many, more) == [
        'add element inet netagent bridges { "br-0000000001f5" }',
        'add element inet netagent same { "br-0000000001f5" . "br-0000000001f5" }',
        'add element inet netagent masq { "br-0000000001f5" }',
    ]


def test_drift_names_what_differs() -> None:
    state = render.render(policy.build([net(1), net(2)]))
    text = script.listing(state)
    damaged = (
        text.replace("\t\tjump user\n", "")
        .replace('"br-000000000001", ', "", 1)
        .replace("\tchain output {", "\tchain stale-x {\n\t}\n\tchain output {")
    )
    assert script.drift(script.parse_listing(damaged), state) == [
        "chain forward rewritten",
        "set bridges elements restored",
        "chain stale-x removed",
    ]
    assert script.drift(script.parse_listing(""), render.State({}, {}))[0] == "chain user recreated"


def test_forwards_of_both_families_and_a_collision() -> None:
    n = net(2)
    st_ = render.render(policy.build([n], [endpoint(n, 5, ("tcp", 8080, 80))]))
    assert st_.elements["dnat4any"] == {"tcp . 8080 : 10.0.2.5 . 80"}
    assert st_.elements["dnat6any"] == {"tcp . 8080 : fd00:0:0:2::5 . 80"}
    assert st_.elements["ported4"] == {'"br-000000000002"'}
    clash = msgspec.structs.replace(endpoint(n, 6, ("tcp", 8080, 81)), id="f" * 64)
    with pytest.raises(ValueError, match="share a key"):
        render.render(policy.build([n], [endpoint(n, 5, ("tcp", 8080, 80)), clash]))


def test_options_are_set_memberships() -> None:
    internal = render.render(policy.build([net(3, internal=True, icc=False)]))
    b = '"br-000000000003"'
    assert internal.elements["internal"] == {b} and internal.elements["icc_off"] == {b}
    assert not internal.elements["masq"]
    plain = render.render(policy.build([net(3, masquerade=False)]))
    assert not plain.elements["masq"] and not plain.elements["internal"]
    assert not plain.elements["icc_off"]


@settings(max_examples=150, deadline=None)
@given(st.lists(topologies, min_size=1, max_size=6), st.booleans())
def test_the_incremental_renderer_equals_render(steps: list, copies: bool) -> None:
    """Any sequence of topologies, networks kept as the same objects between steps (as the
    service's `policy.Builder` keeps them) or all copies: the same state as `render`, and a
    policy `render` refuses is refused too, after which the next one is right again."""
    builder, incremental = policy.Builder(), render.Incremental()
    made: dict[tuple[int, bool, bool, bool], Network] = {}
    for topology in steps:
        nets, eps = [], []
        for i, internal, icc, masq, ports in topology:
            key = (i, internal, icc, masq)
            n = net(i, internal=internal, icc=icc, masquerade=masq)
            nets.append(n if copies else made.setdefault(key, n))
            specs = sorted({(p, 10000 + k, 80 + k) for p, k in ports})  # may clash: refused
            if specs:
                eps.append(endpoint(nets[-1], 2 + len(eps), *specs))
        pol = builder.build(nets, eps)
        try:
            expected = render.render(pol)
        except ValueError:
            with pytest.raises(ValueError):
                incremental.render(pol)
            continue
        got = incremental.render(pol)
        assert got == expected
        assert script.diff(got, expected) == []


def test_the_incremental_renderer_keeps_unchanged_sets() -> None:
    """A create among many networks makes new network sets (not a copy of the port sets),
    and a policy with nothing changed returns every set as the same object."""
    nets = [net(i) for i in range(1, 101)]
    builder, incremental = policy.Builder(), render.Incremental()
    before = incremental.render(builder.build(nets))
    after = incremental.render(builder.build([*nets, net(101)]))
    assert after.elements["dnat4"] is before.elements["dnat4"]
    assert len(after.elements["bridges"]) == 101
    again = incremental.render(builder.build([*nets, net(101)]))
    assert all(again.elements[k] is after.elements[k] for k in render.SETS)
