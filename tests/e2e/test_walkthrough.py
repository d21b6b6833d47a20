"""The seed's walk-through, end to end: real agentd, real kernel, real traffic."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.e2e.harness import (
    add_outside,
    ipv4_of,
    netns_names,
    ns_exec,
    ping,
    routes,
    running_host,
    sh,
    unique,
)

pytestmark = pytest.mark.kernel

ECHO_PEER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(1); s.settimeout(10)
print("ready", flush=True)
c, addr = s.accept(); c.sendall(addr[0].encode()); c.close()
"""

CONNECT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7777), timeout=5); print(c.recv(100).decode())
"""


def _seen_by_outside(outside: str, container: str, outside_ip: str) -> str:
    server = subprocess.Popen(
        ["ip", "netns", "exec", outside, sys.executable, "-c", ECHO_PEER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        return ns_exec(container, sys.executable, "-c", CONNECT, outside_ip).stdout.strip()
    finally:
        server.kill()
        server.wait()


def test_walkthrough() -> None:
    with running_host() as host:
        # start-up: the default network on its bridge with the gateway address
        info = host.call("system.info")
        assert info["networks"] == 1
        assert ipv4_of(host.name, "netagent0") == ["172.17.0.1/16"]
        assert ns_exec(host.name, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
        baseline_rules = host.iptables_save()
        baseline_links = host.link_names()
        if host.backend == "iptables":
            assert "-A FORWARD -m comment --comment netagent -j NETAGENT-FORWARD" in baseline_rules
        else:
            assert "chain forward: oifname @bridges goto to-bridge" in baseline_rules

        # network create: a new bridge on the next pool, down until an endpoint joins
        net_id = host.ctl("network", "create", "test1").stdout.strip()
        bridge = f"br-{net_id[:12]}"
        assert ipv4_of(host.name, bridge) == ["172.18.0.1/16"]
        link = next(x for x in host.links() if x["ifname"] == bridge)
        assert link["linkinfo"]["info_kind"] == "bridge"
        assert "UP" not in link["flags"]

        c1, c2, c3 = unique("c1-"), unique("c2-"), unique("c3-")
        try:
            assert host.ctl("run", "--network", "test1", c1).stdout.strip() == "172.18.0.2"
            assert host.ctl("run", "--network", "test1", c2).stdout.strip() == "172.18.0.3"
            assert host.ctl("run", c3).stdout.strip() == "172.17.0.2"

            # inside a container: eth0 with its address, lo up, default route via the gateway
            assert ipv4_of(c1, "eth0") == ["172.18.0.2/16"]
            assert {"dst": "default", "gateway": "172.18.0.1"}.items() <= routes(c1)[0].items()
            link = next(x for x in host.links() if x["ifname"] == bridge)
            assert "UP" in link["flags"]

            # same network talks; across networks it does not
            assert ping(c1, "172.18.0.3")
            assert ping(c2, "172.18.0.2")
            assert not ping(c3, "172.18.0.2")
            assert not ping(c1, "172.17.0.2")
            # containers reach their gateway (the host)
            assert ping(c3, "172.17.0.1")

            # outbound traffic is masqueraded behind the host's uplink address
            outside, host_ip, outside_ip = add_outside(host)
            try:
                assert _seen_by_outside(outside, c1, outside_ip) == host_ip
                assert _seen_by_outside(outside, c3, outside_ip) == host_ip
                # and the outside cannot open connections into a network
                sh("ip", "-n", outside, "route", "add", "172.18.0.0/16", "via", host_ip)
                assert not ping(outside, "172.18.0.2")
            finally:
                sh("ip", "netns", "del", outside)
                sh("ip", "-n", host.name, "link", "del", "uplink0", check=False)

            ps = host.ctl("ps").stdout
            assert c1 in ps and "172.18.0.3" in ps
        finally:
            for name in (c1, c2, c3):
                host.ctl("rm", name, check=False)

        assert not {c1, c2, c3} & netns_names()
        host.ctl("network", "rm", "test1")
        # nothing left behind: links, addresses, rules exactly as before `network create`
        assert host.link_names() == baseline_links
        assert host.iptables_save() == baseline_rules
        assert host.call("network.list", labels=[])[0]["name"] == "bridge"
        assert len(host.call("network.list", labels=[])) == 1


def test_connect_existing_namespace_by_name_and_path() -> None:
    with running_host() as host:
        named = unique("ns-")
        sh("ip", "netns", "add", named)
        sleeper = subprocess.Popen(["unshare", "--net", "sleep", "60"])
        try:
            time.sleep(0.2)
            host.ctl("network", "create", "--subnet", "10.50.0.0/24", "n1")
            host.ctl("network", "connect", "n1", named)
            host.ctl(
                "network", "connect", "--ip", "10.50.0.99", "n1", f"/proc/{sleeper.pid}/ns/net"
            )
            assert ipv4_of(named, "eth0") == ["10.50.0.2/24"]
            got = sh("nsenter", f"--net=/proc/{sleeper.pid}/ns/net", "ip", "-j", "addr").stdout
            assert '"10.50.0.99"' in got
            assert ns_exec(named, "ping", "-c1", "-W1", "10.50.0.99", check=False).returncode == 0
            # a second network in the same namespace becomes eth1
            host.ctl("network", "connect", "bridge", named)
            assert ipv4_of(named, "eth1") == ["172.17.0.2/16"]
            host.ctl("network", "disconnect", "n1", named)
            host.settle()  # the old eth0 goes with the reaper's next batch
            assert ipv4_of(named, "eth0") == []
            host.ctl("network", "disconnect", "n1", f"/proc/{sleeper.pid}/ns/net")
            host.ctl("network", "disconnect", "bridge", named)
            host.ctl("network", "rm", "n1")
            assert not [n for n in host.link_names() if n.startswith(("na", "br-"))]
        finally:
            sleeper.kill()
            sh("ip", "netns", "del", named, check=False)
