"""The nftables backend against the real nf_tables of the private test namespace.

Checked with the `nft` and `iptables` tools, independently of the backend's own state. Every
test starts and ends with an empty ruleset (the tests share one namespace).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import msgspec
import pytest
import trio

from agent import firewall
from agent.core import naming, policy
from agent.core.errors import FirewallApply
from agent.core.model import Network
from agent.firewall import monitor
from agent.firewall.nftables import coexist, render, script
from agent.firewall.nftables.backend import NftablesFirewall
from agent.firewall.nftables.transport import LibNftables, NftError, NftTool
from tests.golden.test_golden_nft import COMBOS, NFT, combo, combo_name

pytestmark = pytest.mark.kernel


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


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def listed() -> str:
    return sh("nft", "-s", "list", "table", "inet", "netagent", check=False)


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    sh("nft", "flush", "ruleset")
    yield
    sh("nft", "flush", "ruleset")


@pytest.mark.parametrize(("internal", "icc", "masquerade"), COMBOS)
def test_golden_tables_load_and_list_back_identically(
    internal: bool, icc: bool, masquerade: bool
) -> None:
    """The renderer writes what nft prints: a loaded golden table lists back byte for byte,
    and parses back to the rendered State (what drift checks compare)."""
    state = combo(internal, icc, masquerade)
    NftTool().run("\n".join(script.full(state)) + "\n")
    text = listed()
    assert script.parse_listing(text).state() == state
    assert script.drift(script.parse_listing(text), state) == []
    golden = (NFT / combo_name(internal, icc, masquerade)).read_text()
    words = sorted(text.replace(",", " ").split())
    assert words == sorted(golden.replace(",", " ").split())  # element order is the kernel's


def test_a_missing_library_is_a_clear_error() -> None:
    with pytest.raises(NftError, match=r"cannot load libnosuch\.so\.9 \(Debian: libnftables1\)"):
        LibNftables("libnosuch.so.9")


@pytest.mark.parametrize("transport", [LibNftables, NftTool])
def test_transports_commit_all_or_nothing(transport: type) -> None:
    nft = transport()
    nft.run("add table inet netagent\n")
    with pytest.raises(NftError, match="No such file"):
        nft.run("add chain inet netagent good\nadd rule inet netagent nosuchchain accept\n")
    assert "good" not in listed()
    assert "table inet netagent" in nft.run("list table inet netagent\n")


async def test_apply_sends_only_the_difference_and_rm_restores_the_table() -> None:
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    await fw.setup(policy.EMPTY)
    empty = listed()
    nets = [net(i) for i in range(3)]
    await fw.apply(policy.build(nets))
    before = script.parse_listing(listed())
    assert before.state() == render.render(policy.build(nets))
    count = await fw.apply(policy.build([*nets, net(9, icc=False)]))
    added = script.diff(before.state(), render.render(policy.build([*nets, net(9, icc=False)])))
    assert count == len(added) == 4  # bridges, same, icc_off, masq: one element each
    assert all("000000000009" in line for line in added)  # its own chains and elements only
    await fw.apply(policy.build(nets))
    assert script.parse_listing(listed()).state() == before.state()
    await fw.apply(policy.EMPTY)
    assert listed() == empty


async def test_a_refused_diff_converges_from_the_kernel() -> None:
    """An element deleted by hand makes the diff's own delete fail: the backend converges."""
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    nets = [net(1), net(2)]
    await fw.setup(policy.build(nets))
    sh("nft", "delete", "element", "inet", "netagent", "bridges", '{ "br-000000000002" }')
    await fw.apply(policy.build(nets[:1]))
    assert script.parse_listing(listed()).state() == render.render(policy.build(nets[:1]))


@pytest.mark.parametrize(
    "damage",
    [
        ["nft", "flush", "ruleset"],
        ["nft", "delete", "table", "inet", "netagent"],
        ["nft", "flush", "chain", "inet", "netagent", "forward"],
        ["nft", "flush chain inet netagent forward; delete chain inet netagent user"],
        ["nft", "delete", "element", "inet", "netagent", "bridges", '{ "br-000000000001" }'],
        ["nft", "flush", "set", "inet", "netagent", "masq"],
        ["nft", "add", "rule", "inet", "netagent", "to-bridge", "accept"],
    ],
)
async def test_repair_restores_the_table_and_leaves_other_tables_alone(damage: list[str]) -> None:
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    nets = [net(1), net(2, internal=True)]
    pol = policy.build(nets)
    sh("nft", "add", "table", "ip", "other")
    sh("nft", "add", "chain", "ip", "other", "c")
    sh("nft", "add", "rule", "ip", "other", "c", "ip", "saddr", "192.0.2.1", "drop")
    await fw.setup(pol)
    sh("nft", "add", "rule", "inet", "netagent", "user", "ip", "saddr", "192.0.2.2", "drop")
    good, other = listed(), sh("nft", "list", "table", "ip", "other")
    sh(*damage)
    problems = await fw.repair(pol)
    assert problems
    if damage[1] != "flush" or damage[2] != "ruleset":
        assert sh("nft", "list", "table", "ip", "other") == other
    if not any(word in " ".join(damage) for word in ("user", "table", "ruleset")):
        assert listed() == good  # the user's rule survived
    assert script.parse_listing(listed()).state() == render.render(pol)
    assert await fw.repair(pol) == []


async def test_setup_adopts_a_table_without_rewriting_it() -> None:
    """A restart finds its table as it should be: nothing is committed (no traffic cut)."""
    pol = policy.build([net(1), net(2)])
    await NftablesFirewall(LibNftables(), coexistence=False).setup(pol)
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    async with monitor_changes() as changes:
        await fw.setup(pol)
        await trio.sleep(0.2)
    assert changes == []
    assert fw.applied == render.render(pol)


async def test_an_earlier_layouts_sets_and_maps_are_deleted_at_setup() -> None:
    """An upgrade from a layout with other sets (the first version had an interval map of
    subnets, verdict maps): setup deletes what the layout no longer has, and says so."""
    pol = policy.build([net(1)])
    await NftablesFirewall(LibNftables(), coexistence=False).setup(pol)
    sh(
        "nft",
        "add",
        "set",
        "inet",
        "netagent",
        "old_subnets",
        "{ type ipv4_addr; flags interval; }",
    )
    sh("nft", "add", "element", "inet", "netagent", "old_subnets", "{ 10.9.0.0/16 }")
    sh("nft", "add", "map", "inet", "netagent", "old_vmap", "{ type ifname : verdict; }")
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    assert await fw.repair(pol) == ["set old_subnets removed", "map old_vmap removed"]
    text = listed()
    assert "old_subnets" not in text and "old_vmap" not in text
    assert script.parse_listing(text).state() == render.render(pol)
    assert await fw.repair(pol) == []


def test_auto_picks_nftables_where_libnftables_works() -> None:
    assert firewall.resolve("auto") == "nftables"  # the test namespace has nf_tables
    assert firewall.resolve("iptables") == "iptables"
    assert NftablesFirewall.usable()
    assert not NftablesFirewall.usable("libnftables-missing.so.1")


class monitor_changes:
    """Collect the nf_tables commits made while the block runs (in `changes`, as they come)."""

    async def __aenter__(self) -> list[monitor.NftChange]:
        self.changes: list[monitor.NftChange] = []
        send, recv = trio.open_memory_channel[object](100)
        self.nursery_cm = trio.open_nursery()
        self.nursery = await self.nursery_cm.__aenter__()
        await self.nursery.start(monitor.serve_nft_changes, send)

        async def collect() -> None:
            async for item in recv:
                if isinstance(item, monitor.NftChange):
                    self.changes.append(item)

        self.nursery.start_soon(collect)
        return self.changes

    async def __aexit__(self, *exc: object) -> None:
        await trio.sleep(0.1)
        self.nursery.cancel_scope.cancel()
        await self.nursery_cm.__aexit__(None, None, None)


async def test_own_commits_are_not_foreign_and_others_are() -> None:
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    async with monitor_changes() as changes:
        await fw.setup(policy.build([net(1)]))
        await fw.apply(policy.build([net(1), net(2)]))
        await trio.sleep(0.1)
        ours = list(changes)
        sh("nft", "add", "chain", "inet", "netagent", "x")
        sh("nft", "add", "table", "ip", "unrelated")
        await trio.sleep(0.2)
    assert len(ours) == 2 and not any(fw.foreign(c) for c in ours)
    theirs = [c for c in changes if c not in ours]
    assert [fw.foreign(c) for c in theirs] == [True, False]


async def test_bad_policy_is_refused_and_changes_nothing() -> None:
    fw = NftablesFirewall(LibNftables(), coexistence=False)
    await fw.setup(policy.build([net(1)]))
    before = listed()
    clash = msgspec.structs.replace(net(2), bridge=net(1).bridge)
    with pytest.raises(ValueError):
        await fw.apply(policy.build([net(1), clash]))
    bad = msgspec.structs.replace(net(3), bridge='bad"name')
    with pytest.raises(FirewallApply):
        await fw.apply(policy.build([net(1), bad]))
    assert listed() == before


async def test_forward_policy_drop_coexistence_rule_and_retirement() -> None:
    """The marked accept goes on top of iptables FORWARD once, comes back when deleted, and
    goes (with the table) when the iptables backend takes over."""
    sh("iptables", "-P", "FORWARD", "DROP")
    try:
        fw = NftablesFirewall(LibNftables())
        await fw.setup(policy.build([net(1)]))
        rule = " ".join(coexist.ACCEPT_RULE)
        assert sh("iptables", "-S", "FORWARD").splitlines()[1].endswith(rule)
        await fw.setup(policy.build([net(1)]))
        assert sh("iptables", "-S", "FORWARD").count("netagent") == 1
        sh("iptables", "-F", "FORWARD")
        assert any("inserted" in p for p in await fw.repair(policy.build([net(1)])))
        assert coexist.retire_nftables(LibNftables())
        assert "mark" not in sh("iptables", "-S", "FORWARD")
        assert "mark" not in sh("ip6tables", "-S", "FORWARD")
        assert listed() == ""
    finally:
        sh("iptables", "-P", "FORWARD", "ACCEPT")
        for tool in ("iptables", "ip6tables"):
            sh(tool, "-F")


def test_iptables_leftovers_script() -> None:
    saved = "\n".join(
        [
            "*filter",
            ":FORWARD ACCEPT [0:0]",
            ":NETAGENT-FORWARD - [0:0]",
            ":NETAGENT-USER - [0:0]",
            "-A FORWARD -m comment --comment netagent -j NETAGENT-FORWARD",
            "-A FORWARD -s 192.0.2.1/32 -j DROP",
            "-A FORWARD -m mark --mark 0x2000000/0x2000000 -m comment --comment netagent -j ACCEPT",
            "-A NETAGENT-FORWARD -j NETAGENT-USER",
            "COMMIT",
            "*nat",
            ":POSTROUTING ACCEPT [0:0]",
            "COMMIT",
        ]
    )
    assert coexist.iptables_leftovers(saved) == "\n".join(
        [
            "*filter",
            "-D FORWARD -m comment --comment netagent -j NETAGENT-FORWARD",
            "-F NETAGENT-FORWARD",
            "-F NETAGENT-USER",
            "-X NETAGENT-FORWARD",
            "-X NETAGENT-USER",
            "COMMIT",
            "",
        ]
    )
    assert coexist.iptables_leftovers("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n") == ""
