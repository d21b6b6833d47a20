"""Hot-plug and self-healing, live: each reaction checked on the real kernel.

Every test asserts the exact final state (links, addresses, rules, the agent's own view) and that
foreign interfaces and rules were not touched. Reaction times are printed; the assertions allow
generous slack (the 100 ms / 1 s figures are measured by bench/bench_reactions.py).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.e2e.harness import Host, ipv4_of, ns_exec, ping, running_host, sh, unique

pytestmark = pytest.mark.kernel


NETNS_GONE = 20.0  # seconds: a deleted namespace's veth goes when the kernel's cleanup runs


def wait_for(check, timeout: float = 3.0, what: str = "condition") -> float:
    """Poll `check` until true; return the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.01)
    took = time.monotonic() - start
    print(f"{what}: {took * 1000:.0f} ms")
    return took


def link(host: Host, name: str) -> dict | None:
    return next((x for x in host.links() if x["ifname"] == name), None)


def foreign_setup(host: Host) -> None:
    """Links and rules the agent does not own, in the host namespace."""
    sh("ip", "-n", host.name, "link", "add", "userbr0", "type", "bridge")
    sh("ip", "-n", host.name, "link", "add", "uveth0", "type", "veth", "peer", "name", "uveth1")
    ns_exec(host.name, "iptables", "-I", "FORWARD", "-s", "192.0.2.7", "-j", "DROP")
    ns_exec(
        host.name, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.8", "-j", "RETURN"
    )


def foreign_intact(host: Host) -> None:
    names = host.link_names()
    assert {"userbr0", "uveth0", "uveth1"} <= names
    assert "UP" not in link(host, "userbr0")["flags"]  # we never bring up what is not ours
    rules = host.iptables_save()
    assert "-A FORWARD -s 192.0.2.7/32 -j DROP" in rules
    assert "-A POSTROUTING -s 192.0.2.8/32 -j RETURN" in rules


@pytest.fixture
def host():
    with running_host() as h:
        foreign_setup(h)
        yield h


def test_namespace_deleted_releases_endpoint(host: Host) -> None:
    ns = unique("gone-")
    sh("ip", "netns", "add", ns)
    ep = host.call("endpoint.connect", network="bridge", netns=ns)
    sh("ip", "netns", "del", ns)
    # the kernel deletes a namespace's links in its own time (cleanup_net, a workqueue that
    # waits for RCU): seconds on a loaded machine; agentd's reaction time is bench_reactions'
    wait_for(lambda: host.call("endpoint.list") == [], NETNS_GONE, "namespace deleted -> released")
    assert ep["host_ifname"] not in host.link_names()
    # the address is back in the pool: it can be asked for again
    other = unique("again-")
    sh("ip", "netns", "add", other)
    try:
        again = host.call("endpoint.connect", network="bridge", netns=other, ip=ep["ip"])
        assert again["ip"] == ep["ip"]
    finally:
        sh("ip", "netns", "del", other)
    wait_for(lambda: host.call("endpoint.list") == [], NETNS_GONE, "second release")
    foreign_intact(host)


def test_sandbox_namespace_deleted_by_hand_is_forgotten(host: Host) -> None:
    name = unique("sb-")
    host.ctl("run", name)
    sh("ip", "netns", "del", name)
    wait_for(lambda: host.call("endpoint.list") == [], NETNS_GONE, "sandbox deleted -> released")
    # the sandbox is gone from the agent too: its name can be used again
    assert host.ctl("run", name).stdout.strip() == "172.17.0.3"
    host.ctl("rm", name)


def test_veth_deleted_by_hand_releases_endpoint(host: Host) -> None:
    name = unique("v-")
    host.ctl("run", name)
    ep = host.call("endpoint.list")[0]
    sh("ip", "-n", host.name, "link", "del", ep["host_ifname"])
    wait_for(lambda: host.call("endpoint.list") == [], what="veth deleted -> released")
    assert ipv4_of(name, "eth0") == []
    host.ctl("rm", name, check=False)
    foreign_intact(host)


def test_bridge_deleted_is_recreated_with_its_endpoints(host: Host) -> None:
    a, b = unique("a-"), unique("b-")
    net_id = host.ctl("network", "create", "--subnet", "10.40.0.0/24", "heal").stdout.strip()
    bridge = f"br-{net_id[:12]}"
    host.ctl("run", "--network", "heal", a)
    host.ctl("run", "--network", "heal", b)
    rules_before = host.iptables_save()
    sh("ip", "-n", host.name, "link", "del", bridge)

    def healed() -> bool:
        br = link(host, bridge)
        return (
            br is not None
            and "UP" in br["flags"]
            and ipv4_of(host.name, bridge) == ["10.40.0.1/24"]
        )

    wait_for(healed, what="bridge deleted -> recreated")
    br_index = link(host, bridge)["ifindex"]
    for ep in host.call("endpoint.list"):
        if ep["ip"].startswith("10.40."):
            assert link(host, ep["host_ifname"]).get("master") == bridge
    assert br_index
    assert ping(a, "10.40.0.3")
    assert host.iptables_save() == rules_before
    host.ctl("rm", a, b)
    host.ctl("network", "rm", "heal")
    foreign_intact(host)


def test_links_set_down_are_brought_up(host: Host) -> None:
    a, b = unique("a-"), unique("b-")
    host.ctl("run", a)
    host.ctl("run", b)
    ep = host.call("endpoint.list")[0]
    sh("ip", "-n", host.name, "link", "set", ep["host_ifname"], "down")
    wait_for(lambda: "UP" in link(host, ep["host_ifname"])["flags"], what="veth down -> up")
    sh("ip", "-n", host.name, "link", "set", "netagent0", "down")
    wait_for(lambda: "UP" in link(host, "netagent0")["flags"], what="bridge down -> up")
    assert ping(a, "172.17.0.3")
    # foreign links set down stay down
    sh("ip", "-n", host.name, "link", "set", "uveth0", "up")
    sh("ip", "-n", host.name, "link", "set", "uveth0", "down")
    time.sleep(0.3)
    assert "UP" not in link(host, "uveth0")["flags"]
    host.ctl("rm", a, b)
    foreign_intact(host)


def test_gateway_address_removed_is_restored(host: Host) -> None:
    sh("ip", "-n", host.name, "addr", "del", "172.17.0.1/16", "dev", "netagent0")
    wait_for(lambda: ipv4_of(host.name, "netagent0") == ["172.17.0.1/16"], what="gateway restored")
    time.sleep(0.2)  # and it stays: restored once, not twice
    assert ipv4_of(host.name, "netagent0") == ["172.17.0.1/16"]
    foreign_intact(host)


@pytest.mark.parametrize(
    "damage",
    [
        ["iptables", "-F", "NETAGENT-FORWARD"],
        ["iptables", "-F", "NETAGENT-ISOLATION-STAGE-2"],
        [
            "iptables",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "netagent",
            "-j",
            "NETAGENT-FORWARD",
        ],
        ["iptables", "-t", "nat", "-F", "NETAGENT-POSTROUTING"],
        # another tool's restore, in one transaction (no window for the agent to interleave)
        [
            "sh",
            "-c",
            "printf '*filter\\n-F NETAGENT-FORWARD\\n-F NETAGENT-USER\\n-X NETAGENT-USER\\n"
            "COMMIT\\n' | iptables-restore --noflush",
        ],
    ],
    ids=["flush-forward", "flush-isolation", "delete-jump", "flush-nat", "flush-and-delete-user"],
)
@pytest.mark.backend("iptables")  # the nftables table's: tests/e2e/test_firewall_backends.py
def test_firewall_drift_is_repaired(host: Host, damage: list[str]) -> None:
    host.ctl("network", "create", "drift")

    def lines() -> list[str]:
        # a restored jump goes back to the top of FORWARD, above a foreign rule inserted after
        # ours: compare the lines, each exactly once, not their order in the built-in chain
        return sorted(host.iptables_save().splitlines())

    baseline = lines()
    ns_exec(host.name, *damage)
    wait_for(lambda: lines() == baseline, timeout=5, what=f"{damage[1]} -> restored")
    time.sleep(0.3)  # and it stays so: no duplicates appear later
    assert lines() == baseline
    foreign_intact(host)


def test_foreign_rule_changes_are_left_alone(host: Host) -> None:
    baseline = host.iptables_save()
    ns_exec(host.name, "iptables", "-A", "FORWARD", "-s", "192.0.2.9", "-j", "ACCEPT")
    time.sleep(0.5)  # a drift check runs (a foreign change) and finds nothing of ours to fix
    after = host.iptables_save()
    assert "\n-A FORWARD -s 192.0.2.9/32 -j ACCEPT" in after
    assert after.replace("\n-A FORWARD -s 192.0.2.9/32 -j ACCEPT", "") == baseline


@pytest.mark.backend("iptables")  # the nftables table's: tests/e2e/test_firewall_backends.py
def test_reconcile_reports_repairs() -> None:
    with running_host("--repair", "manual") as host:
        assert host.ctl("reconcile").stdout.strip() == "nothing to repair"
        ns_exec(host.name, "iptables", "-F", "NETAGENT-FORWARD")
        sh("ip", "-n", host.name, "addr", "del", "172.17.0.1/16", "dev", "netagent0")
        time.sleep(0.3)
        assert ipv4_of(host.name, "netagent0") == []  # manual: nothing repaired by itself
        out = host.ctl("reconcile").stdout
        assert "netagent0" in out and "NETAGENT-FORWARD" in out
        assert ipv4_of(host.name, "netagent0") == ["172.17.0.1/16"]
        assert "-A NETAGENT-FORWARD -j NETAGENT-USER" in host.iptables_save()
        assert host.ctl("reconcile").stdout.strip() == "nothing to repair"


def test_event_stream_delivers_each_event_once_in_order() -> None:
    with running_host() as host:
        proc = subprocess.Popen(
            [str(host_ctl_path()), "--socket", host.socket, "events", "--json"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(0.3)
            name, gone = unique("ev-"), unique("evg-")
            net_id = host.ctl("network", "create", "evnet").stdout.strip()
            host.ctl("run", "--network", "evnet", name)
            sh("ip", "netns", "add", gone)
            host.call("endpoint.connect", network="evnet", netns=gone)
            sh("ip", "netns", "del", gone)
            wait_for(lambda: len(host.call("endpoint.list")) == 1, what="release")
            host.ctl("rm", name)
            host.ctl("network", "rm", "evnet")
            events = [json.loads(proc.stdout.readline()) for _ in range(6)]
        finally:
            proc.terminate()
            proc.wait(5)
        got = [(e["type"], e["action"]) for e in events]
        assert got == [
            ("network", "created"),
            ("endpoint", "connected"),
            ("endpoint", "connected"),
            ("endpoint", "released"),
            ("endpoint", "disconnected"),
            ("network", "removed"),
        ]
        assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
        assert events[0]["id"] == net_id == events[-1]["id"]
        assert events[1]["id"] == events[4]["id"] != events[2]["id"] == events[3]["id"]


def host_ctl_path():
    from tests.e2e.harness import VENV_BIN

    return VENV_BIN / "agentctl"
