"""IptablesFirewall with fake appliers (no root, no iptables): dual stack all or nothing,
IPv4-only mode, published ports' side effects from the policy, and which nf_tables changes
are foreign. Against the real kernel: tests/shell/test_iptables.py."""

from __future__ import annotations

import pytest
import trio
from msgspec.structs import replace

from agent.core import naming, policy
from agent.core.errors import FirewallApply
from agent.core.model import Endpoint, Network, PortMapping
from agent.firewall import conntrack
from agent.firewall.iptables import rules
from agent.firewall.iptables.applier import FamilyApplier
from agent.firewall.iptables.backend import (
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    Applier,
    IptablesFirewall,
)
from agent.firewall.monitor import NftChange
from tests.conformance import assert_implements


class FakeApplier:
    """An `Applier` holding the ruleset it was last given; fails or hangs on demand."""

    def __init__(self) -> None:
        self.applied = rules.EMPTY
        self.calls: list[tuple[str, rules.Ruleset]] = []
        self.fail = False
        self.hang = False

    async def setup(self, new: rules.Ruleset) -> int:
        return await self._take("setup", new)

    async def apply(self, new: rules.Ruleset) -> int:
        return await self._take("apply", new)

    async def _take(self, call: str, new: rules.Ruleset) -> int:
        await trio.lowlevel.checkpoint()  # as the real one does, taking its lock
        self.calls.append((call, new))
        if self.hang:
            await trio.sleep_forever()
        if self.fail:
            raise FirewallApply(f"{call} failed on purpose", line="-A X")
        self.applied = new
        return 1

    async def repair(self, new: rules.Ruleset) -> list[str]:
        return []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def text(self) -> str:
        return f"{self.applied.rule_count()} rules\n"

    def rule_count(self) -> int:
        return self.applied.rule_count()


def network(i: int, *, ipv6: bool = True) -> Network:
    ident = f"{i:012x}" + "ef" * 26
    net = Network(
        id=ident, name=f"n{i}", bridge=naming.bridge_name(ident),
        subnet=f"10.0.{i}.0/24", gateway=f"10.0.{i}.1",
    )  # fmt: skip
    if ipv6:
        net = replace(net, ipv6=True, subnet6=f"fd00:{i}::/64", gateway6=f"fd00:{i}::1")
    return net


def published(net: Network, *ports: int) -> Endpoint:
    return Endpoint(
        id=f"{ports[0]:064x}", network_id=net.id, netns="/run/netns/c", netns_key="1:1",
        ifname="eth0", host_ifname=f"na{ports[0]}", mac="02:42:00:00:00:02",
        ip=net.gateway[:-1] + "2", ip6=net.gateway6[:-1] + "2" if net.gateway6 else None,
        ports=tuple(PortMapping(protocol="tcp", host_port=p, container_port=80) for p in ports),
    )  # fmt: skip


@pytest.fixture
def fakes() -> tuple[FakeApplier, FakeApplier, IptablesFirewall]:
    v4, v6 = FakeApplier(), FakeApplier()
    return v4, v6, IptablesFirewall(v4, v6, own_pids={41, 42})


def test_the_appliers_implement_what_the_backend_needs() -> None:
    assert_implements(FamilyApplier(), Applier)
    assert_implements(FakeApplier(), Applier)


async def test_ipv4_then_ipv6_each_its_own_ruleset(fakes) -> None:
    v4, v6, fw = fakes
    p = policy.build([network(1), network(2, ipv6=False)])
    assert await fw.apply(p) == 2
    assert v4.applied == rules.render(p.v4) and v6.applied == rules.render(p.v6)
    assert len(p.v4.networks) == 2 and len(p.v6.networks) == 1
    assert fw.policy is p
    assert fw.rule_count() == v4.rule_count() + v6.rule_count()
    assert fw.text() == f"{v4.rule_count()} rules\n# ip6tables-restore\n{v6.rule_count()} rules\n"


async def test_an_ipv6_failure_puts_ipv4_back_and_keeps_the_last_policy(fakes) -> None:
    v4, v6, fw = fakes
    before = policy.build([network(1)])
    await fw.setup(before)
    after = policy.build([network(1), network(2)])
    v6.fail = True
    with pytest.raises(FirewallApply, match="apply failed on purpose"):
        await fw.apply(after)
    assert [(call, new) for call, new in v4.calls] == [
        ("setup", rules.render(before.v4)),
        ("apply", rules.render(after.v4)),
        ("apply", rules.render(before.v4)),  # put back
    ]
    assert v4.applied == rules.render(before.v4) and v6.applied == rules.render(before.v6)
    assert fw.policy is before
    v6.fail = False
    await fw.apply(after)
    assert fw.policy is after and v6.applied == rules.render(after.v6)


async def test_ipv4_is_put_back_even_when_cancelled_during_ipv6(fakes) -> None:
    v4, v6, fw = fakes
    before = policy.build([network(1)])
    await fw.setup(before)
    v6.hang = True
    with trio.move_on_after(0.01):
        await fw.apply(policy.build([network(1), network(2)]))
    assert v4.applied == rules.render(before.v4)  # the restore was not cancelled too
    assert fw.policy is before


async def test_an_ipv4_failure_leaves_ipv6_alone(fakes) -> None:
    v4, v6, fw = fakes
    await fw.setup(policy.build([]))
    v4.fail = True
    with pytest.raises(FirewallApply):
        await fw.apply(policy.build([network(1)]))
    assert [call for call, _ in v6.calls] == ["setup"]
    assert fw.policy == policy.build([])


async def test_ipv4_only_when_ip6tables_fails_at_setup_without_ipv6_networks(fakes) -> None:
    v4, v6, fw = fakes
    v6.fail = True
    await fw.setup(policy.build([network(1, ipv6=False)]))
    assert fw.v6 is None and "setup failed on purpose" in fw.v6_error
    assert await fw.apply(policy.build([network(1, ipv6=False), network(2, ipv6=False)])) == 1
    v4_calls = len(v4.calls)
    with pytest.raises(FirewallApply, match="IPv6 networks need ip6tables") as info:
        await fw.apply(policy.build([network(1, ipv6=False), network(3)]))
    assert len(v4.calls) == v4_calls  # refused before anything was tried
    assert "setup failed on purpose" in info.value.data["stderr"]
    assert [call for call, _ in v6.calls] == ["setup"]
    assert "ip6tables" not in fw.text() and fw.rule_count() == v4.rule_count()


async def test_setup_with_ipv6_networks_needs_ip6tables(fakes) -> None:
    _, v6, fw = fakes
    v6.fail = True
    with pytest.raises(FirewallApply, match="setup failed on purpose"):
        await fw.setup(policy.build([network(1)]))
    assert fw.v6 is v6
    off = IptablesFirewall(FakeApplier(), None)
    with pytest.raises(FirewallApply, match="ip6tables is not configured"):
        await off.setup(policy.build([network(1)]))


async def test_port_side_effects_follow_the_policy(fakes, monkeypatch) -> None:
    _, v6, fw = fakes
    localnet: list[str] = []
    flushed: list[list[str]] = []

    async def flush(forwards: list[policy.Forward]) -> int:
        flushed.append([" ".join(conntrack.flush_argv(f)) for f in forwards])
        return 0

    monkeypatch.setattr(conntrack, "route_localnet", localnet.append)
    monkeypatch.setattr(conntrack, "flush", flush)
    a, b = network(1), network(2, ipv6=False)
    ep = published(a, 8080)
    await fw.setup(policy.build([a, b], [ep]))
    assert localnet == [a.bridge] and flushed == []
    await fw.apply(policy.build([a, b], [published(b, 9090), ep]))
    assert localnet == [a.bridge, b.bridge] and flushed == []
    v6.fail = True  # a failed change has no side effect
    with pytest.raises(FirewallApply):
        await fw.apply(policy.build([a, b]))
    assert localnet == [a.bridge, b.bridge] and flushed == []
    v6.fail = False
    await fw.apply(policy.build([a, b], [published(b, 9090)]))
    assert flushed == [
        [
            "conntrack -D -p tcp --orig-port-dst 8080 --reply-src 10.0.1.2 --reply-port-src 80",
            "conntrack -D -p tcp --orig-port-dst 8080 -f ipv6 --reply-src fd00:1::2 "
            "--reply-port-src 80",
        ]
    ]
    fw.bridge_recreated(a.bridge)  # no port left there
    fw.bridge_recreated(b.bridge)
    assert localnet == [a.bridge, b.bridge, b.bridge]


@pytest.mark.parametrize(
    ("pid", "tables", "foreign"),
    [
        (7, {(NFPROTO_IPV4, "filter")}, True),
        (7, {(NFPROTO_IPV4, "nat")}, True),
        (7, {(NFPROTO_IPV6, "filter")}, True),
        (7, {(NFPROTO_IPV6, "nat"), (NFPROTO_IPV4, "mangle")}, True),
        (41, {(NFPROTO_IPV4, "filter")}, False),  # the agent's own restore
        (42, {(NFPROTO_IPV6, "nat")}, False),
        (7, {(NFPROTO_IPV4, "mangle"), (NFPROTO_IPV4, "raw")}, False),  # not our tables
        (7, {(1, "filter")}, False),  # an `nft` inet table
        (7, {(NFPROTO_IPV6, "security")}, False),
        (7, set(), False),
    ],
)
def test_foreign_changes(fakes, pid: int, tables: set, foreign: bool) -> None:
    _, _, fw = fakes
    assert fw.foreign(NftChange(1, pid, "iptables", frozenset(tables))) is foreign


def test_the_default_backend_shares_one_pid_record() -> None:
    fw = IptablesFirewall.default()
    assert isinstance(fw.v4, FamilyApplier) and isinstance(fw.v6, FamilyApplier)
    assert fw.v4.restorer.own_pids is fw.v6.restorer.own_pids is fw.own_pids
    assert fw.v6.restorer.restore_binary == "ip6tables-restore"
    fw.v6.restorer.own_pids.append(1234)
    assert not fw.foreign(NftChange(1, 1234, "ip6tables-resto", frozenset({(10, "nat")})))
