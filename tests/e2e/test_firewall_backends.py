"""Firewall backends end to end: iptables FORWARD policy DROP, switching backends on a restart,
the nftables table's self-healing and its adoption at restart."""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e import traffic
from tests.e2e.harness import Host, add_outside, ns_exec, ping, running_host, sh, unique

pytestmark = pytest.mark.kernel


def wait_for(check, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout} s"
        time.sleep(0.02)


def flows(host: Host, outside: str, host_ip: str, outside_ip: str, c1: str, c2: str) -> None:
    """Masquerade out, same-bridge traffic, a published port from outside; nothing in."""
    with traffic.serve(outside, tcp=[7777]), traffic.serve(c1, tcp=[80]):
        assert traffic.tcp(c1, outside_ip, 7777) == host_ip
        assert traffic.tcp(c2, "172.31.0.2", 80) == "172.31.0.3"
        assert traffic.tcp(outside, host_ip, 8080) == outside_ip
        assert traffic.tcp(outside, "172.31.0.2", 80) is None


def setup_flows(host: Host) -> tuple[str, str, str, str, str]:
    outside, host_ip, outside_ip = add_outside(host)
    sh("ip", "-n", outside, "route", "add", "172.31.0.0/24", "via", host_ip)
    c1, c2 = unique("c1-"), unique("c2-")
    host.ctl("network", "create", "--subnet", "172.31.0.0/24", "n1")
    host.ctl("run", "--network", "n1", "-p", "8080:80", c1)
    host.ctl("run", "--network", "n1", c2)
    return outside, host_ip, outside_ip, c1, c2


def test_traffic_flows_when_the_iptables_forward_policy_is_drop() -> None:
    """Another tool (Docker) set FORWARD to DROP before the agent started, and after."""
    host = Host()
    try:
        ns_exec(host.name, "iptables", "-P", "FORWARD", "DROP")
        ns_exec(host.name, "ip6tables", "-P", "FORWARD", "DROP")
        host.start()
        outside, host_ip, outside_ip, c1, c2 = setup_flows(host)
        c3 = unique("c3-")
        try:
            flows(host, outside, host_ip, outside_ip, c1, c2)
            # Docker's own chains come later, inserted above ours: still flowing
            ns_exec(host.name, "iptables", "-N", "DOCKER-USER")
            ns_exec(host.name, "iptables", "-I", "FORWARD", "-j", "DOCKER-USER")
            flows(host, outside, host_ip, outside_ip, c1, c2)
            # and the isolation still holds: another network cannot reach n1
            host.ctl("network", "create", "--subnet", "172.31.1.0/24", "n2")
            host.ctl("run", "--network", "n2", c3)
            assert ping(c1, "172.31.0.3") and not ping(c3, "172.31.0.2")
        finally:
            sh("ip", "netns", "del", outside)
            for c in (c1, c2, c3):
                host.ctl("rm", c, check=False)
    finally:
        host.close()


def footprint(host: Host) -> tuple[bool, bool]:
    """(iptables backend's chains present, nftables backend's table or mark rule present)."""
    saved = ns_exec(host.name, "iptables-save").stdout + ns_exec(host.name, "ip6tables-save").stdout
    nft = ns_exec(host.name, "nft", "list", "tables").stdout
    return "NETAGENT" in saved, "netagent" in nft or "-m mark --mark 0x2000000" in saved


@pytest.mark.backend("iptables")
def test_switching_backends_on_restart_leaves_nothing_of_the_other() -> None:
    with running_host("--firewall", "iptables") as host:
        outside, host_ip, outside_ip, c1, c2 = setup_flows(host)
        iptables_only = host.iptables_save()
        assert footprint(host) == (True, False)
        for kind, want in (("nftables", (False, True)), ("iptables", (True, False))):
            host.stop()
            host.extra_args[host.extra_args.index("--firewall") + 1] = kind
            host.backend = kind
            host.start()
            assert footprint(host) == want, kind
            flows(host, outside, host_ip, outside_ip, c1, c2)
        # the same rules again (dispatch order aside: a fresh setup appends networks in order)
        assert sorted(host.iptables_save().splitlines()) == sorted(iptables_only.splitlines())
        sh("ip", "netns", "del", outside)


def handles(host: Host) -> str:
    """The table with its objects' handles: a rewrite changes them."""
    text = ns_exec(host.name, "nft", "-a", "-s", "list", "table", "inet", "netagent").stdout
    return text


@pytest.mark.backend("nftables")
def test_restart_adopts_the_table_without_rewriting_it() -> None:
    with running_host() as host:
        outside, host_ip, outside_ip, c1, c2 = setup_flows(host)
        before = handles(host)
        host.stop()
        host.start()
        assert handles(host) == before
        flows(host, outside, host_ip, outside_ip, c1, c2)
        sh("ip", "netns", "del", outside)


@pytest.mark.backend("nftables")
@pytest.mark.parametrize(
    "damage",
    [
        "flush ruleset",
        "delete table inet netagent",
        "flush chain inet netagent forward",
        "delete element inet netagent dnat4any { tcp . 8080 }",
        "flush set inet netagent masq",
    ],
)
def test_the_table_is_repaired_and_other_tables_are_left_alone(damage: str) -> None:
    with running_host() as host:
        outside, host_ip, outside_ip, c1, c2 = setup_flows(host)
        ns_exec(host.name, "nft", "add table ip other; add chain ip other c")
        ns_exec(host.name, "nft", "add rule ip other c ip saddr 192.0.2.1 drop")
        ns_exec(host.name, "nft", "add rule inet netagent user ip saddr 192.0.2.2 drop")
        good = host.nft_table()
        ns_exec(host.name, "nft", damage)
        want = good
        if damage in ("flush ruleset", "delete table inet netagent"):
            want = good.replace("\nchain user: ip saddr 192.0.2.2 drop", "")  # went with it
        wait_for(lambda: host.nft_table() == want, what="repaired")
        if damage != "flush ruleset":
            assert "192.0.2.1" in ns_exec(host.name, "nft", "list", "table", "ip", "other").stdout
        flows(host, outside, host_ip, outside_ip, c1, c2)
        time.sleep(0.3)
        assert host.nft_table() == want  # repaired once, and it stays so
        sh("ip", "netns", "del", outside)


@pytest.mark.backend("nftables")
def test_reconcile_reports_repairs_of_the_table() -> None:
    with running_host("--repair", "manual") as host:
        assert host.ctl("reconcile").stdout.strip() == "nothing to repair"
        ns_exec(host.name, "nft", "flush chain inet netagent forward")
        out = host.ctl("reconcile").stdout
        assert "chain forward rewritten" in out
        assert "chain forward: oifname @bridges goto to-bridge" in host.nft_table()
        assert host.ctl("reconcile").stdout.strip() == "nothing to repair"
        ruleset = host.ctl("ruleset").stdout
        assert re.search(r"set same \{\n\t\ttype ifname . ifname", ruleset)
        assert "nftables" in host.ctl("info").stdout


def counters(host: Host, chain: str) -> list[int]:
    """Packet counters of `chain`'s rules, in order (iptables -L -v -x)."""
    out = ns_exec(host.name, "iptables", "-L", chain, "-v", "-x", "-n").stdout.splitlines()
    return [int(line.split()[0]) for line in out[2:] if line.strip()]


@pytest.mark.backend("iptables")
def test_iptables_walks_the_per_network_rules_for_a_flows_first_packet_only() -> None:
    """The connmark shortcut: once a network's chain accepted a flow, its later packets (both
    ways) are accepted at the head of NETAGENT-FORWARD, before isolation and dispatch."""
    with running_host() as host:
        outside, _, outside_ip = add_outside(host)
        c1 = unique("c1-")
        try:
            for i in range(3):
                host.ctl("network", "create", f"n{i}")
            host.ctl("run", "--network", "n2", c1)
            before = counters(host, "NETAGENT-ISOLATION-STAGE-1")
            assert ns_exec(c1, "ping", "-c", "20", "-i", "0.01", "-q", outside_ip).returncode == 0
            walked = sum(counters(host, "NETAGENT-ISOLATION-STAGE-1")) - sum(before)
            assert walked == 1  # the first echo request; 19 more and 20 replies took the shortcut
            assert counters(host, "NETAGENT-FORWARD")[1] >= 39
        finally:
            host.ctl("rm", c1, check=False)
            sh("ip", "netns", "del", outside)
