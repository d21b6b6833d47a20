"""The iptables renderer and its transactions (agent.firewall.iptables.rules, .transaction):
rendering per option, and transactions checked by a tiny iptables model."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from agent.core import naming, policy
from agent.core.model import Endpoint, Network, PortMapping
from agent.firewall.iptables import rules, transaction

VERDICTS = {"ACCEPT", "DROP", "RETURN", "MASQUERADE", "CONNMARK"}
BUILTINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


def net(i: int, **options: object) -> Network:
    ident = f"{i:012x}" + "ab" * 26
    return Network(
        id=ident,
        name=f"n{i}",
        bridge=naming.bridge_name(ident),
        subnet=f"10.{i // 256}.{i % 256}.0/24",
        gateway=f"10.{i // 256}.{i % 256}.1",
        **options,
    )


def render(networks: list[Network], endpoints: list[Endpoint] | tuple[()] = ()) -> rules.Ruleset:
    """The IPv4 ruleset of `networks`, through the policy as the backend renders it."""
    return rules.render(policy.build(networks, endpoints).v4)


# --- a tiny model of iptables-restore --noflush, strict where the kernel is ------------------


class Rejected(Exception):
    pass


def fresh_kernel() -> dict[str, dict[str, list[tuple[str, ...]]]]:
    return {table: {chain: [] for chain in chains} for table, chains in BUILTINS.items()}


def run(kernel: dict, script: transaction.Script) -> None:
    """Apply `script` to `kernel` in place, table by table, failing like iptables would."""
    for table, declares, ops in script.tables:
        chains = kernel.setdefault(table, {})
        for chain in declares:
            chains[chain] = []  # create, or flush an existing chain
        for op, chain, rule in ops:
            if chain not in chains:
                raise Rejected(f"no chain {chain}")
            if op == "-A":
                chains[chain].append(rule)
            elif op == "-I":
                chains[chain].insert(int(rule[0]) - 1, rule[1:])
            elif op == "-D":
                if rule not in chains[chain]:
                    raise Rejected(f"no rule {rule} in {chain}")
                chains[chain].remove(rule)
            elif op == "-F":
                chains[chain].clear()
            elif op == "-X":
                if chains[chain] or any(chain in r for rs in chains.values() for r in rs):
                    raise Rejected(f"chain {chain} busy")
                del chains[chain]
            else:
                raise Rejected(f"unknown op {op}")
        for rs in chains.values():  # every jump must land at COMMIT
            for r in rs:
                target = r[r.index("-j") + 1]
                if target not in VERDICTS and target not in chains:
                    raise Rejected(f"jump to missing {target}")


def agent_view(kernel: dict) -> rules.Ruleset:
    """The agent's chains in `kernel` as a Ruleset (NETAGENT-USER is not part of it)."""
    tables = {
        t: {
            c: tuple(rs) for c, rs in chains.items() if c.startswith("NETAGENT") and c != rules.USER
        }
        for t, chains in kernel.items()
    }
    tables = {t: cs for t, cs in tables.items() if cs}
    heads = {k: h for k, h in rules.DISPATCH_HEADS.items() if k[1] in tables.get(k[0], {})}
    return rules.Ruleset(tables, heads)


def converge(kernel: dict, networks: list[Network]) -> rules.Ruleset:
    """What FamilyApplier.setup does, against the model."""
    new = render(networks)
    existing = {(t, c) for t, cs in kernel.items() for c in cs}
    present = {(t, c, r) for t, cs in kernel.items() for c, rs in cs.items() for r in rs}
    missing = [j for j in rules.builtin_jumps() if j not in present]
    script = transaction.full(
        new,
        existing_chains=existing,
        missing_jumps=missing,
        user_chain_exists=("filter", rules.USER) in existing,
    )
    run(kernel, script)
    return new


# --- rendering -----------------------------------------------------------------------------


def chain_of(network: Network) -> tuple[tuple[str, ...], ...]:
    return render([network]).chains("filter")[naming.network_chain(network.id)]


ACCEPT = "NETAGENT-ACCEPT"


def test_render_default_network() -> None:
    n = net(1)
    b, c = n.bridge, naming.network_chain(n.id)
    ruleset = render([n])
    assert ruleset.chains("filter") == {
        "NETAGENT-FORWARD": (
            ("-j", "NETAGENT-USER"),
            rules.established_shortcut(),
            ("-j", "NETAGENT-ISOLATION-STAGE-1"),
            ("-o", b, "-j", c),
            ("-i", b, "-j", c),
        ),
        "NETAGENT-ISOLATION-STAGE-1": (
            ("-i", b, "!", "-o", b, "-j", "NETAGENT-ISOLATION-STAGE-2"),
        ),
        "NETAGENT-ISOLATION-STAGE-2": (("-o", b, "-j", "DROP"),),
        c: (
            ("-o", b, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", ACCEPT),
            ("-i", b, "!", "-o", b, "-j", "NETAGENT-ACCEPT"),
            ("-i", b, "-o", b, "-j", "NETAGENT-ACCEPT"),
            ("-o", b, "-j", "DROP"),
        ),
        "NETAGENT-ACCEPT": (
            ("-j", "CONNMARK", "--set-xmark", "0x2000000/0x2000000"),
            ("-j", "ACCEPT"),
        ),
    }
    assert ruleset.chains("nat") == {
        "NETAGENT-DNAT": (),
        "NETAGENT-POSTROUTING": (("-s", "10.0.1.0/24", "!", "-o", b, "-j", "MASQUERADE"),),
    }
    assert ruleset.rule_count() == 5 + 1 + 1 + 4 + 2 + 1


NO_NAT = {"NETAGENT-DNAT": (), "NETAGENT-POSTROUTING": ()}


def test_render_icc_off_drops_bridge_local_traffic() -> None:
    n = net(2, icc=False)
    assert chain_of(n)[2] == ("-i", n.bridge, "-o", n.bridge, "-j", "DROP")
    assert len(chain_of(n)) == 4


def test_render_internal_network() -> None:
    for icc, verdict in ((True, "NETAGENT-ACCEPT"), (False, "DROP")):
        n = net(3, internal=True, icc=icc)
        b = n.bridge
        assert chain_of(n) == (
            ("-i", b, "-o", b, "-j", verdict),
            ("-i", b, "-j", "DROP"),
            ("-o", b, "-j", "DROP"),
        )
        assert render([n]).chains("nat") == NO_NAT


def test_render_masquerade_off() -> None:
    n = net(4, masquerade=False)
    assert render([n]).chains("nat") == NO_NAT
    assert chain_of(n) == chain_of(net(4))


def test_render_canonical_subnet_and_ipv4_only() -> None:
    n = replace(net(5), subnet="10.9.0.77/16")
    assert render([n]).chains("nat")["NETAGENT-POSTROUTING"][0][1] == "10.9.0.0/16"
    with pytest.raises(ValueError):
        render([replace(net(5), subnet="fd00::/64")])
    with pytest.raises(ValueError, match="collide"):
        render([net(6), replace(net(6), id=net(6).id[:12] + "cd" * 26)])


def test_builtin_jumps_are_tagged() -> None:
    assert rules.builtin_jumps() == [
        ("filter", "FORWARD", ("-m", "comment", "--comment", "netagent", "-j", "NETAGENT-FORWARD")),
        (
            "nat",
            "POSTROUTING",
            ("-m", "comment", "--comment", "netagent", "-j", "NETAGENT-POSTROUTING"),
        ),
        ("nat", "PREROUTING", (*LOCAL, "-m", "comment", "--comment", "netagent", "-j", DNAT)),
        ("nat", "OUTPUT", (*LOCAL, "-m", "comment", "--comment", "netagent", "-j", DNAT)),
    ]


LOCAL = ("-m", "addrtype", "--dst-type", "LOCAL")
DNAT = "NETAGENT-DNAT"


def test_render_is_deterministic() -> None:
    networks = [net(i, icc=i % 2 == 0, internal=i % 3 == 0) for i in range(30)]
    shuffled = networks[:]
    random.Random(7).shuffle(shuffled)
    a, b = render(networks), render(shuffled)
    assert a == b
    assert list(a.items()) == list(b.items())  # same order too, not only equal


def test_rendering_a_thousand_networks_again_renders_none_anew() -> None:
    """A sync re-renders every network: an unchanged one must cost a cache hit, keyed by its
    (memoised) NetworkPolicy, whatever Network object or policy it came from."""
    many = [net(i) for i in range(1000)]
    render(many)
    before = rules._network_parts.cache_info()
    render([replace(n) for n in many])  # equal networks, new objects; a new policy
    after = rules._network_parts.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1000, 0)
    assert rules._network_parts.cache_info().maxsize >= 2 * 1000  # both families fit


def test_ruleset_is_immutable_and_ignores_dispatch_tail_order() -> None:
    a = render([net(1), net(2)])
    with pytest.raises(AttributeError):
        a.tables = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.tables["filter"]["X"] = ()  # type: ignore[index]
    fwd = a.chains("filter")["NETAGENT-FORWARD"]
    swapped = {**a.chains("filter"), "NETAGENT-FORWARD": fwd[:3] + fwd[3:][::-1]}
    b = rules.Ruleset({"filter": swapped, "nat": a.chains("nat")}, a.heads)
    assert a == b and hash(a) == hash(b)
    owned = naming.network_chain(net(1).id)
    c_rules = a.chains("filter")[owned]
    c = rules.Ruleset({**a.tables, "filter": {**a.chains("filter"), owned: c_rules[::-1]}}, a.heads)
    assert a != c  # an owned chain's order matters
    head_swapped = {**a.chains("filter"), "NETAGENT-FORWARD": (fwd[1], fwd[0], *fwd[2:])}
    assert a != rules.Ruleset({"filter": head_swapped, "nat": a.chains("nat")}, a.heads)


# --- transactions --------------------------------------------------------------------------

network_sets = st.lists(
    st.builds(
        lambda i, internal, icc, masq: net(i, internal=internal, icc=icc, masquerade=masq),
        st.integers(0, 40),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    max_size=12,
    unique_by=lambda n: n.id,
)


@settings(max_examples=150, deadline=None)
@given(old=network_sets, new=network_sets)
def test_diff_applied_to_old_yields_new(old: list[Network], new: list[Network]) -> None:
    kernel = fresh_kernel()
    before = converge(kernel, old)
    assert agent_view(kernel) == before
    run(kernel, transaction.diff(before, render(new)))
    assert agent_view(kernel) == render(new)
    assert kernel["filter"][rules.USER] == [("-j", "RETURN")]
    assert len(kernel["filter"]["FORWARD"]) == 1 and len(kernel["nat"]["POSTROUTING"]) == 1


@settings(max_examples=60, deadline=None)
@given(networks=network_sets)
def test_diff_of_equal_rulesets_is_empty(networks: list[Network]) -> None:
    ruleset = render(networks)
    assert len(transaction.diff(ruleset, ruleset)) == 0
    assert transaction.diff(ruleset, render(list(reversed(networks)))).tables == ()


@settings(max_examples=60, deadline=None)
@given(old=network_sets, new=network_sets)
def test_full_converges_from_anything_and_is_idempotent(
    old: list[Network], new: list[Network]
) -> None:
    kernel = fresh_kernel()
    kernel["filter"]["FORWARD"].append(("-s", "10.9.9.9/32", "-j", "DROP"))
    kernel["filter"]["OTHER-TOOL"] = [("-j", "RETURN")]
    converge(kernel, old)
    kernel["filter"][rules.USER].insert(0, ("-s", "10.1.1.1/32", "-j", "ACCEPT"))
    kernel["filter"]["NETAGENT-N-deadbeefdead"] = [("-j", "DROP")]  # a crash's leftover
    converge(kernel, new)
    once = {t: {c: list(rs) for c, rs in cs.items()} for t, cs in kernel.items()}
    converge(kernel, new)
    assert kernel == once
    assert agent_view(kernel) == render(new)
    assert kernel["filter"]["FORWARD"] == [
        rules.builtin_jumps()[0][2],
        ("-s", "10.9.9.9/32", "-j", "DROP"),
    ]
    assert kernel["filter"]["OTHER-TOOL"] == [("-j", "RETURN")]
    assert kernel["filter"][rules.USER] == [("-s", "10.1.1.1/32", "-j", "ACCEPT"), ("-j", "RETURN")]


def test_full_flushes_but_keeps_stale_chain_a_foreign_rule_jumps_to() -> None:
    kernel = fresh_kernel()
    kernel["filter"]["NETAGENT-N-old000000000"] = [("-j", "DROP")]
    kernel["filter"]["INPUT"].append(("-j", "NETAGENT-N-old000000000"))
    script = transaction.full(
        render([]),
        stale_chains={("filter", "NETAGENT-N-old000000000")},
        flush_only={("filter", "NETAGENT-N-old000000000")},
    )
    run(kernel, script)
    assert kernel["filter"]["NETAGENT-N-old000000000"] == []


def test_removing_a_network_removes_exactly_its_rules() -> None:
    others = [net(i) for i in range(5)]
    gone = net(9, icc=False)
    script = transaction.diff(render([*others, gone]), render(others))
    chain = naming.network_chain(gone.id)
    ops = [(t.table, op, c, r) for t in script.tables for op, c, r in t.ops]
    assert [t.declares for t in script.tables] == [(), ()]
    assert sorted(ops) == sorted(
        [
            ("filter", "-D", "NETAGENT-FORWARD", ("-o", gone.bridge, "-j", chain)),
            ("filter", "-D", "NETAGENT-FORWARD", ("-i", gone.bridge, "-j", chain)),
            ("filter", "-D", "NETAGENT-ISOLATION-STAGE-1", rules.isolation_stage1(gone.bridge)),
            ("filter", "-D", "NETAGENT-ISOLATION-STAGE-2", rules.isolation_stage2(gone.bridge)),
            ("filter", "-F", chain, ()),
            ("filter", "-X", chain, ()),
            ("nat", "-D", "NETAGENT-POSTROUTING", rules.masquerade(gone.subnet, gone.bridge)),
        ]
    )
    # nat first: so the restore loads MASQUERADE before any deleting commit (loading an
    # extension after one waits for an RCU grace period)
    assert [t.table for t in script.tables] == ["nat", "filter"]
    filter_ops = script.tables[1].ops
    assert [op for op, _, _ in filter_ops[-2:]] == ["-F", "-X"]  # after the jumps are deleted


def test_sections_stay_filter_then_nat_unless_that_order_waits() -> None:
    # only additions: no commit deletes, so the order stays
    script = transaction.diff(render([net(1)]), render([net(1), net(2)]))
    assert [t.table for t in script.tables] == ["filter", "nat"]
    # publishing rewrites the filter chain (a flush) and makes nat load DNAT: nat goes first
    eps = [
        Endpoint(
            id="e" * 64, network_id=net(1).id, netns="/run/netns/c", netns_key="1:1",
            ifname="eth0", host_ifname="na0", ip="10.0.1.2", mac="02:42:00:00:00:02",
            ports=(PortMapping(protocol="tcp", host_port=8080, container_port=80),),
        )
    ]  # fmt: skip
    script = transaction.diff(render([net(1)]), render([net(1)], eps))
    assert [t.table for t in script.tables] == ["nat", "filter"]
    # unpublishing: nat only deletes (no extension to load after filter's flush): order stays
    script = transaction.diff(render([net(1)], eps), render([net(1)]))
    assert [t.table for t in script.tables] == ["filter", "nat"]


def test_changed_network_rewrites_only_its_chain() -> None:
    a, b = net(1), net(2)
    script = transaction.diff(render([a, b]), render([a, replace(b, icc=False)]))
    chain = naming.network_chain(b.id)
    assert script.tables[0].declares == (chain,)
    assert [op[:2] for op in script.tables[0].ops] == [("-A", chain)] * 4
    assert len(script) == 5


def test_adding_one_network_to_a_thousand_is_small() -> None:
    many = [net(i) for i in range(1000)]
    old = render(many)
    script = transaction.diff(old, render([*many, net(1000)]))
    # declare C + 4 rules in C + 2 dispatch + 2 isolation + 1 masquerade
    assert len(script) == 10
    assert len(transaction.diff(old, render(many[1:]))) == 7


@given(
    st.lists(st.sampled_from("abcdef"), max_size=12),
    st.lists(st.sampled_from("abcdef"), max_size=12),
)
def test_dispatch_delta_is_the_multiset_difference(old: list[str], new: list[str]) -> None:
    """Distinct rules take the set path, duplicates the multiset one: same answer either way."""
    head = (("-j", "HEAD"),)
    before = head + tuple(("-j", r) for r in old)
    after = head + tuple(("-j", r) for r in new)
    deletes, adds = transaction._dispatch_delta("C", 1, before, after)
    tail = list(before[1:])
    for _, chain, rule in deletes:  # apply: -D removes the first match, -A appends
        assert chain == "C"
        tail.remove(rule)
    tail += [rule for _, _, rule in adds]
    assert sorted(tail) == sorted(after[1:])
    assert all(op == "-D" for op, _, _ in deletes) and all(op == "-A" for op, _, _ in adds)
    # minimal: nothing deleted that stays, nothing added that was there
    assert len(deletes) == sum((Counter(old) - Counter(new)).values())
    assert len(adds) == sum((Counter(new) - Counter(old)).values())
