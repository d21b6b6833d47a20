"""FamilyApplier (and the backend over it) against the real iptables (nf_tables) of the private
test namespace.

Checked with `iptables-save`, independently of the applier's own state. Every test starts and
ends with empty filter and nat tables, IPv4 and IPv6 (the tests share one namespace).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
import trio
from msgspec.structs import replace

from agent.core import naming, policy
from agent.core.errors import FirewallApply
from agent.core.model import Network
from agent.firewall.iptables import rules, transaction
from agent.firewall.iptables.applier import FamilyApplier
from agent.firewall.iptables.backend import IptablesFirewall
from agent.firewall.iptables.restore import Restorer, discard
from agent.firewall.iptables.save import parse_save
from agent.firewall.iptables.serialize import serialize as pure_serialize

pytestmark = pytest.mark.kernel


def net(i: int, **options: object) -> Network:
    ident = f"{i:012x}" + "cd" * 26
    return Network(
        id=ident,
        name=f"n{i}",
        bridge=naming.bridge_name(ident),
        subnet=f"10.{i // 256}.{i % 256}.0/24",
        gateway=f"10.{i // 256}.{i % 256}.1",
        **options,
    )


def render(networks: list[Network]) -> rules.Ruleset:
    """The IPv4 ruleset of `networks`, through the policy."""
    return rules.render(policy.build(networks).v4)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def reset() -> None:
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat"):
            sh(tool, "-t", table, "-F")
            sh(tool, "-t", table, "-X")


def save(tool: str = "iptables-save") -> list[str]:
    """`iptables-save` (or `tool`) without its timestamp comments."""
    out = subprocess.run([tool], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


@pytest.fixture(autouse=True)
def clean_tables() -> Iterator[None]:
    reset()
    yield
    reset()


def add_foreign() -> list[str]:
    """A user's rules and another tool's chain; returns their iptables-save lines."""
    sh("iptables", "-I", "FORWARD", "-s", "10.9.9.9", "-j", "DROP")
    sh("iptables", "-N", "OTHER-TOOL")
    sh("iptables", "-A", "OTHER-TOOL", "-s", "10.8.8.8/32", "-j", "ACCEPT")
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.7.0.0/16", "-j", "MASQUERADE")
    return [
        ":OTHER-TOOL - [0:0]",
        "-A FORWARD -s 10.9.9.9/32 -j DROP",
        "-A OTHER-TOOL -s 10.8.8.8/32 -j ACCEPT",
        "-A POSTROUTING -s 10.7.0.0/16 -j MASQUERADE",
    ]


async def test_setup_on_empty_ruleset_gives_exact_lines() -> None:
    n = net(1)
    b, c = n.bridge, naming.network_chain(n.id)
    fw = FamilyApplier()
    await fw.setup(render([n]))
    assert save() == [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":NETAGENT-ACCEPT - [0:0]",
        ":NETAGENT-FORWARD - [0:0]",
        ":NETAGENT-ISOLATION-STAGE-1 - [0:0]",
        ":NETAGENT-ISOLATION-STAGE-2 - [0:0]",
        f":{c} - [0:0]",
        ":NETAGENT-USER - [0:0]",
        "-A FORWARD -m comment --comment netagent -j NETAGENT-FORWARD",
        "-A NETAGENT-ACCEPT -j CONNMARK --set-xmark 0x2000000/0x2000000",
        "-A NETAGENT-ACCEPT -j ACCEPT",
        "-A NETAGENT-FORWARD -j NETAGENT-USER",
        "-A NETAGENT-FORWARD -m connmark --mark 0x2000000/0x2000000 -m conntrack --ctstate "
        "RELATED,ESTABLISHED -j ACCEPT",
        "-A NETAGENT-FORWARD -j NETAGENT-ISOLATION-STAGE-1",
        f"-A NETAGENT-FORWARD -o {b} -j {c}",
        f"-A NETAGENT-FORWARD -i {b} -j {c}",
        f"-A NETAGENT-ISOLATION-STAGE-1 -i {b} ! -o {b} -j NETAGENT-ISOLATION-STAGE-2",
        f"-A NETAGENT-ISOLATION-STAGE-2 -o {b} -j DROP",
        f"-A {c} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j NETAGENT-ACCEPT",
        f"-A {c} -i {b} ! -o {b} -j NETAGENT-ACCEPT",
        f"-A {c} -i {b} -o {b} -j NETAGENT-ACCEPT",
        f"-A {c} -o {b} -j DROP",
        "-A NETAGENT-USER -j RETURN",
        "COMMIT",
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":NETAGENT-DNAT - [0:0]",
        ":NETAGENT-POSTROUTING - [0:0]",
        "-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment netagent -j NETAGENT-DNAT",
        "-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment netagent -j NETAGENT-DNAT",
        "-A POSTROUTING -m comment --comment netagent -j NETAGENT-POSTROUTING",
        f"-A NETAGENT-POSTROUTING -s 10.0.1.0/24 ! -o {b} -j MASQUERADE",
        "COMMIT",
    ]
    assert fw.applied == render([n])
    assert (await fw.observe()).ruleset() == fw.applied
    assert fw.rule_count() == 14
    # What `agentctl ruleset` shows is exactly what start-up fed iptables-restore.
    assert fw.text() == pure_serialize(transaction.full(render([n])))


async def test_setup_twice_is_identical_and_keeps_user_rules() -> None:
    networks = [net(1), net(2, internal=True), net(3, icc=False, masquerade=False)]
    await FamilyApplier().setup(render(networks))
    sh("iptables", "-I", "NETAGENT-USER", "-s", "10.1.1.1/32", "-j", "ACCEPT")
    first = save()
    fw = FamilyApplier()  # a restart: nothing known in memory
    await fw.setup(render(networks))
    assert save() == first
    assert first.count("-A FORWARD -m comment --comment netagent -j NETAGENT-FORWARD") == 1
    assert "-A NETAGENT-USER -s 10.1.1.1/32 -j ACCEPT" in first
    assert await fw.apply(render(networks)) == 0


async def test_foreign_rules_survive_every_operation() -> None:
    foreign = add_foreign()
    fw = FamilyApplier()

    def check() -> None:
        lines = save()
        assert all(lines.count(line) == 1 for line in foreign), lines

    await fw.setup(render([net(1)]))
    check()
    assert save().index(
        "-A FORWARD -m comment --comment netagent -j NETAGENT-FORWARD"
    ) < save().index("-A FORWARD -s 10.9.9.9/32 -j DROP")  # our jump is inserted at the top
    await fw.apply(render([net(1), net(2)]))
    check()
    await fw.apply(render([]))
    check()
    await FamilyApplier().setup(render([net(3)]))
    check()


async def test_sync_add_then_remove_returns_to_baseline_exactly() -> None:
    add_foreign()
    fw = FamilyApplier()
    base = [net(1), net(2, icc=False)]
    await fw.setup(render(base))
    baseline = save()
    for extra in (net(7), net(8, internal=True), net(9, masquerade=False)):
        assert await fw.apply(render([*base, extra])) > 0
        assert save() != baseline
        assert (
            f"-A NETAGENT-FORWARD -o {extra.bridge} -j {naming.network_chain(extra.id)}" in save()
        )
        assert (await fw.observe()).ruleset() == fw.applied == render([*base, extra])
        assert await fw.apply(render(base)) > 0
        assert save() == baseline
        assert (await fw.observe()).ruleset() == fw.applied


async def test_failing_transaction_raises_and_changes_nothing() -> None:
    fw = FamilyApplier()
    good = net(1)
    await fw.setup(render([good]))
    before, applied = save(), fw.applied
    bad = replace(net(2), bridge="br-" + "x" * 20)  # longer than IFNAMSIZ: iptables refuses it
    with pytest.raises(FirewallApply) as info:
        await fw.apply(render([good, bad]))
    assert info.value.data["line"] is not None and bad.bridge in info.value.data["line"]
    assert "IFNAMSIZ" in info.value.data["stderr"]
    assert save() == before
    assert fw.applied == applied
    assert await fw.apply(render([good])) == 0  # still in step with the kernel

    broken = FamilyApplier(Restorer(restore="false"))
    await FamilyApplier().setup(render([good]))
    broken.applied = fw.applied
    with pytest.raises(FirewallApply):
        await broken.apply(render([good, net(3)]))
    assert save() == before
    missing = FamilyApplier(Restorer(save="/nonexistent/iptables-save"))
    with pytest.raises(FirewallApply, match="could not run"):
        await missing.setup(render([good]))
    assert save() == before


async def test_failure_in_a_later_table_rolls_back_the_committed_one() -> None:
    fw = FamilyApplier()
    a, b = net(1), net(2)
    await fw.setup(render([a, b]))
    masq = f"-s {b.subnet} ! -o {b.bridge} -j MASQUERADE"
    sh("iptables", "-t", "nat", "-D", "NETAGENT-POSTROUTING", *masq.split())  # drift
    before, applied = save(), fw.applied
    with pytest.raises(FirewallApply) as info:
        await fw.apply(render([a]))  # filter commits, then nat's -D fails
    assert info.value.data["line"] == f"-D NETAGENT-POSTROUTING {masq}"
    assert info.value.data["rolled_back"] is True
    assert save() == before
    assert fw.applied == applied


async def test_one_more_network_after_200_is_a_small_transaction() -> None:
    fw = FamilyApplier()
    many = [net(i) for i in range(200)]
    await fw.setup(render(many))
    assert await fw.apply(render([*many, net(200)])) == 10
    lines = save()
    assert sum(line.startswith(":NETAGENT-N-") for line in lines) == 201
    assert sum(line.startswith("-A NETAGENT-POSTROUTING ") for line in lines) == 201
    assert await fw.apply(render([*many[1:], net(200)])) == 7


async def test_setup_removes_a_crash_leftover_chain() -> None:
    await FamilyApplier().setup(render([net(1), net(2)]))
    sh("iptables", "-N", "NETAGENT-N-deadbeefdead")
    sh("iptables", "-A", "NETAGENT-N-deadbeefdead", "-j", "DROP")
    sh("iptables", "-N", "NETAGENT-N-feedfeedfeed")
    sh("iptables", "-A", "INPUT", "-j", "NETAGENT-N-feedfeedfeed")  # a foreign jump to it
    fw = FamilyApplier()
    await fw.setup(render([net(1)]))
    lines = save()
    assert ":NETAGENT-N-deadbeefdead - [0:0]" not in lines
    assert naming.network_chain(net(2).id) not in "\n".join(lines)
    assert ":NETAGENT-N-feedfeedfeed - [0:0]" in lines  # flushed, kept: still referenced
    assert "-A INPUT -j NETAGENT-N-feedfeedfeed" in lines
    seen = parse_save("\n".join(lines))
    assert seen.missing_jumps() == [] and seen.user_chain_exists()


async def test_cancellation_never_lands_inside_a_transaction() -> None:
    fw = FamilyApplier()
    await fw.setup(render([net(1)]))
    before = save()
    with trio.CancelScope() as scope:
        scope.cancel()
        await fw.apply(render([net(1), net(2)]))  # cancelled before it starts: nothing happens
    assert save() == before and fw.applied == render([net(1)])
    for delay in (0.0005, 0.002, 0.005, 0.01):
        wanted = [net(i) for i in range(1, 120)] if fw.applied.rule_count() < 100 else [net(1)]
        with trio.move_on_after(delay):
            await fw.apply(render(wanted))
        # Whatever the moment, the kernel holds exactly what `applied` says.
        assert (await fw.observe()).ruleset() == fw.applied


async def test_observe_reads_quoted_tokens_back() -> None:
    await FamilyApplier().setup(render([]))
    comment = 'say "hi" it\'s'
    sh("iptables", "-I", "NETAGENT-USER", "-m", "comment", "--comment", comment, "-j", "ACCEPT")
    seen = parse_save("\n".join(save()))
    rule = ("-m", "comment", "--comment", comment, "-j", "ACCEPT")
    assert seen.chains[("filter", "NETAGENT-USER")] == [rule, ("-j", "RETURN")]
    assert seen.ruleset() == render([])


async def test_spare_process_applies_transactions_and_reports_failures(nursery) -> None:
    fw = FamilyApplier()
    await nursery.start(fw.serve)
    good = net(1)
    await fw.setup(render([good]))
    used = []
    for extra in (net(7), net(8, internal=True)):
        await trio.sleep(0.05)  # let the keeper start its spare
        spare = fw.restorer._spare
        assert spare is not None and spare.returncode is None and spare.pid in fw.restorer.own_pids
        await fw.apply(render([good, extra]))
        assert await exit_code(spare) == 0  # this transaction ran in the spare
        used.append(spare.pid)
        assert (await fw.observe()).ruleset() == fw.applied == render([good, extra])
    assert len(set(used)) == 2  # a new spare for each transaction
    # a failure in a spare is reported exactly as in a process of its own
    await trio.sleep(0.05)
    assert fw.restorer._spare is not None
    before, applied = save(), fw.applied
    bad = replace(net(2), bridge="br-" + "x" * 20)
    with pytest.raises(FirewallApply) as info:
        await fw.apply(render([good, net(8, internal=True), bad]))
    assert bad.bridge in info.value.data["line"] and "IFNAMSIZ" in info.value.data["stderr"]
    assert save() == before and fw.applied == applied


async def test_a_dead_spare_is_replaced_and_the_spare_dies_with_its_keeper() -> None:
    fw = FamilyApplier()
    async with trio.open_nursery() as nursery:
        await nursery.start(fw.serve)
        await trio.sleep(0.05)
        spare = fw.restorer._spare
        assert spare is not None
        spare.kill()
        await spare.wait()
        await fw.setup(render([net(1)]))  # runs in a process of its own, not in the dead spare
        assert (await fw.observe()).ruleset() == fw.applied == render([net(1)])
        await trio.sleep(0.05)
        last = fw.restorer._spare
        assert last is not None and last is not spare and last.returncode is None
        await fw.apply(render([]))  # a deleting commit, whose process exits slowly
        nursery.cancel_scope.cancel()
    assert last.returncode is not None and fw.restorer._spare is None  # no idle process left behind
    assert restore_children() == set()  # nor one still exiting


async def test_no_spare_for_a_legacy_backend(nursery) -> None:
    # a legacy iptables-restore may hold the xtables lock from its start: never keep one idle
    fw = FamilyApplier(Restorer(restore="iptables-legacy-restore"))
    await nursery.start(fw.serve)
    await trio.sleep(0.1)
    assert fw.restorer._spare is None and fw.restorer._want_spare is None


def restore_children() -> set[int]:
    """Live iptables-restore processes started by this test process."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith(("iptables-restor", "sleep")):
                    found.add(int(pid))
    return found


async def exit_code(process: trio.Process) -> int:
    """The exit code of a process that `serve` (not this test) is reaping."""
    with trio.fail_after(10):
        while process.returncode is None:
            await trio.sleep(0.01)
    return process.returncode


async def test_a_transaction_answers_at_its_commit_not_at_its_exit(tmp_path, nursery) -> None:
    # nf_tables makes the exit after a deleting commit wait an RCU grace period: with `serve`
    # running, the transaction is complete once the restore has echoed the committed marker
    slow_exit = tmp_path / "slow-exit"
    slow_exit.write_text(
        '#!/bin/sh\ncase "$1" in --version) exec iptables-restore "$@";; esac\n'
        'iptables-restore "$@" || exit $?\nexec sleep 30\n'
    )
    slow_exit.chmod(0o755)
    fw = FamilyApplier(Restorer(restore=str(slow_exit)))
    await nursery.start(fw.serve)
    with trio.fail_after(10):  # far below the 30 s exit
        await fw.setup(render([net(1)]))
        await fw.apply(render([]))  # deletes rules
    assert (await fw.observe()).ruleset() == fw.applied == render([])
    exiting = [pid for pid in restore_children() if comm(pid) == "sleep"]
    assert len(exiting) == 2  # both restores are still on their way out
    for pid in exiting:
        os.kill(pid, 9)
    await trio.sleep(0.2)
    assert not [pid for pid in restore_children() if comm(pid) == "sleep"]  # reaped by serve
    # a failure is still reported: the marker never comes
    bad = replace(net(2), bridge="br-" + "x" * 20)
    with pytest.raises(FirewallApply, match="IFNAMSIZ"):
        await fw.apply(render([bad]))
    assert (await fw.observe()).ruleset() == fw.applied


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


async def test_spares_taken_while_one_starts_leave_exactly_one_behind(nursery) -> None:
    fw = FamilyApplier()
    await nursery.start(fw.serve)
    taken = []
    for _ in range(50):  # take as fast as the keeper makes them, often mid-start
        if (spare := await fw.restorer._take_spare()) is not None:
            taken.append(spare)
        await trio.sleep(0)
    for spare in taken:
        await discard(spare)
    await trio.sleep(0.2)
    assert fw.restorer._spare is not None
    assert restore_children() == {fw.restorer._spare.pid}


async def test_a_hung_restore_is_killed_at_the_timeout(tmp_path) -> None:
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    fw = FamilyApplier(Restorer(restore=str(hang), timeout=0.3))
    fw.applied, fw._converged = render([]), True
    with trio.fail_after(5), pytest.raises(FirewallApply, match=r"timed out after 0\.3 s"):
        await fw.apply(render([net(1)]))
    assert restore_children() == set() and not fw._converged  # killed; next sync converges


def dual_stack(i: int) -> Network:
    return replace(net(i), ipv6=True, subnet6=f"fd00:{i}::/64", gateway6=f"fd00:{i}::1")


async def test_backend_puts_ipv4_back_when_ipv6_fails() -> None:
    fw = IptablesFirewall.default()
    a, b = dual_stack(1), dual_stack(2)
    await fw.setup(policy.build([a, b]))
    assert f"-A NETAGENT-POSTROUTING -s fd00:2::/64 ! -o {b.bridge} -j MASQUERADE" in save(
        "ip6tables-save"
    )
    assert "# ip6tables-restore" in fw.text() and fw.rule_count() == 2 * 23
    # drift: b's IPv6 masquerade is gone, so removing b fails in ip6tables' nat section
    masq = f"-s fd00:2::/64 ! -o {b.bridge} -j MASQUERADE"
    sh("ip6tables", "-t", "nat", "-D", "NETAGENT-POSTROUTING", *masq.split())
    before4, before6 = save(), save("ip6tables-save")
    with pytest.raises(FirewallApply) as info:
        await fw.apply(policy.build([a]))
    assert info.value.data["line"] == f"-D NETAGENT-POSTROUTING {masq}"
    assert save() == before4  # IPv4 had removed b: it is back
    assert save("ip6tables-save") == before6  # IPv6 rolled its filter section back itself
    assert fw.policy == policy.build([a, b])
    assert await fw.repair(fw.policy) == ["ip6 chain nat/NETAGENT-POSTROUTING rewritten"]
    assert await fw.apply(policy.build([a])) > 0
    assert naming.network_chain(b.id) not in "\n".join(save() + save("ip6tables-save"))
