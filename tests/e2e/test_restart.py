"""agentd restarts adopt what they own: same networks, endpoints, addresses and rules, once."""

from __future__ import annotations

import signal

import pytest

from tests.e2e.harness import ipv4_of, ping, running_host, sh, unique

pytestmark = pytest.mark.kernel


def _snapshot(host) -> tuple:
    nets = sorted((n["name"], n["id"], n["subnet"]) for n in host.call("network.list", labels=[]))
    eps = sorted(
        (e["netns"], e["ip"], e["mac"], e["host_ifname"]) for e in host.call("endpoint.list")
    )
    return nets, eps, host.iptables_save(), host.link_names()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_adopts_everything(sig: int) -> None:
    with running_host() as host:
        c1, c2 = unique("r1-"), unique("r2-")
        host.ctl("network", "create", "--subnet", "10.60.0.0/24", "keep")
        host.ctl("run", "--network", "keep", c1)
        host.ctl("run", "--network", "keep", c2)
        host.ctl("run", c1 + "b")
        before = _snapshot(host)
        assert host.stop(sig) in (0, -signal.SIGKILL)
        # SIGTERM leaves everything in place, like Docker
        assert ipv4_of(c1, "eth0") == ["10.60.0.2/24"]
        host.start()
        after = _snapshot(host)
        assert after == before
        assert ping(c1, "10.60.0.3")
        # the allocator remembers what is taken and where its cursor was
        c3 = unique("r3-")
        assert host.ctl("run", "--network", "keep", c3).stdout.strip() == "10.60.0.4"
        for name in (c1, c2, c3, c1 + "b"):
            host.ctl("rm", name)


def test_restart_releases_endpoints_whose_namespace_vanished() -> None:
    with running_host() as host:
        named = unique("gone-")
        sh("ip", "netns", "add", named)
        host.ctl("network", "connect", "bridge", named)
        host.stop()
        sh("ip", "netns", "del", named)
        host.start()
        assert host.call("endpoint.list") == []
        assert not [n for n in host.link_names() if n.startswith("na")]
        # its address is free again (round robin continues after it, then wraps)
        other = unique("new-")
        sh("ip", "netns", "add", other)
        try:
            assert (
                host.call("endpoint.connect", network="bridge", netns=other)["ip"] == "172.17.0.3"
            )
        finally:
            sh("ip", "netns", "del", other)


def test_restart_recreates_missing_bridge_and_veth() -> None:
    with running_host() as host:
        c1 = unique("rb-")
        net_id = host.ctl("network", "create", "rb").stdout.strip()
        host.ctl("run", "--network", "rb", c1)
        before = _snapshot(host)
        host.stop()
        sh("ip", "-n", host.name, "link", "del", f"br-{net_id[:12]}")  # takes nothing else
        host.start()
        assert _snapshot(host) == before
        assert ping(c1, before[1][0][1].replace(".2", ".1"))
        host.ctl("rm", c1)
