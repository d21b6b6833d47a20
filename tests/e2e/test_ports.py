"""Published ports end to end: real agentd, real DNAT, TCP and UDP traffic between namespaces."""

from __future__ import annotations

import pytest

from tests.e2e import traffic
from tests.e2e.harness import add_outside, ns_exec, running_host, sh, unique

pytestmark = pytest.mark.kernel


def conntrack_count(host: str, port: int) -> int:
    r = ns_exec(host, "conntrack", "-L", "-p", "udp", "--orig-port-dst", str(port), check=False)
    return sum(1 for line in r.stdout.splitlines() if line.startswith("udp"))


def test_published_ports_reach_the_container_from_everywhere() -> None:
    with running_host() as host:
        baseline = host.iptables_save()
        outside, host_ip, outside_ip = add_outside(host)
        c1, c2 = unique("c1-"), unique("c2-")
        try:
            net_id = host.ctl("network", "create", "--subnet", "172.30.0.0/24", "n1").stdout
            localnet = f"net.ipv4.conf.br-{net_id[:12]}.route_localnet"
            host.ctl("run", "--network", "n1", "-p", "8080:80", "-p", "127.0.0.1:9090:90/udp",
                     "-p", "7000-7001:70-71/udp", c1)  # fmt: skip
            host.ctl("run", "--network", "n1", c2)
            gw = "172.30.0.1"
            assert ns_exec(host.name, "sysctl", "-n", localnet).stdout.strip() == "1"
            with traffic.serve(c1, tcp=[80], udp=[90, 70, 71]):
                # from an outside namespace through the host: the source is kept
                assert traffic.tcp(outside, host_ip, 8080) == outside_ip
                assert traffic.udp(outside, host_ip, 7001) == outside_ip
                # 9090 is published on 127.0.0.1 only
                assert traffic.udp(outside, host_ip, 9090) is None
                # from the host itself: its own address and localhost (masqueraded)
                assert traffic.tcp(host.name, host_ip, 8080) == host_ip
                assert traffic.tcp(host.name, "127.0.0.1", 8080) == gw
                assert traffic.udp(host.name, "127.0.0.1", 9090) == gw
                # hairpin: another member, and the container reaching its own port
                assert traffic.tcp(c2, host_ip, 8080) == "172.30.0.3"
                assert traffic.tcp(c1, host_ip, 8080) == gw
                assert traffic.tcp(c1, gw, 8080) == gw
                # an unpublished port stays closed from outside
                sh("ip", "-n", outside, "route", "add", "172.30.0.0/24", "via", host_ip)
                assert traffic.tcp(outside, "172.30.0.2", 80) is None

                # port publish / unpublish on an existing endpoint
                host.ctl("port", "publish", c2, "8081:80")
                with traffic.serve(c2, tcp=[80]):
                    assert traffic.tcp(outside, host_ip, 8081) == outside_ip
                    host.ctl("port", "unpublish", c2, "8081:80")
                    assert traffic.tcp(outside, host_ip, 8081) is None

                # a UDP flow's conntrack entry goes with its mapping
                assert traffic.udp(outside, host_ip, 7000, src_port=40000) == outside_ip
                assert conntrack_count(host.name, 7000) == 1
                host.ctl("port", "unpublish", c1, "7000:70/udp")
                assert conntrack_count(host.name, 7000) == 0
                assert traffic.udp(outside, host_ip, 7000, src_port=40000) is None
                assert traffic.udp(outside, host_ip, 7001) == outside_ip
            ep = host.call("port.publish", netns=c1, ports=["5000:50"])
            assert [m["host_port"] for m in ep["ports"]] == [5000, 8080, 7001, 9090]  # tcp, udp
        finally:
            for name in (c1, c2):
                host.ctl("rm", name, check=False)
            sh("ip", "netns", "del", outside, check=False)
            sh("ip", "-n", host.name, "link", "del", "uplink0", check=False)
        host.ctl("network", "rm", "n1")
        assert host.iptables_save() == baseline


def test_port_conflicts_and_bad_specs_change_nothing() -> None:
    with running_host() as host:
        c1, c2 = unique("c1-"), unique("c2-")
        try:
            host.ctl("run", "-p", "8080:80", "-p", "10.1.2.3:53:53/udp", c1)
            before = host.iptables_save()
            cases = [
                (["run", "-p", "8080:81", c2], 4, "0.0.0.0:8080/tcp is already published"),
                (["run", "-p", "127.0.0.1:8080:80", c2], 4, "already published"),
                (["run", "-p", "53:53/udp", c2], 4, "10.1.2.3:53/udp is already published"),
                (["run", "-p", "70000:80", c2], 5, "1 to 65535"),
                (["run", "-p", "80:80/sctp", c2], 5, "unknown protocol"),
                (["run", "-p", "8000-8001:80", c2], 5, "differ in size"),
                (["port", "publish", c1, "8080:80"], 4, "already published"),
                (["port", "publish", c1, "9000:90", "9000:91"], 4, "already published"),
                (["port", "unpublish", c1, "9999:80"], 3, "not published"),
            ]
            for argv, code, words in cases:
                r = host.ctl(*argv, check=False)
                assert r.returncode == code, (argv, r.stderr)
                assert words in r.stderr, (argv, r.stderr)
            assert host.iptables_save() == before
            assert c2 not in sh("ip", "netns", "list").stdout
            # the same host port on another protocol or another address is fine
            host.ctl("run", "-p", "8080:80/udp", "-p", "10.1.2.4:53:53/udp", c2)
        finally:
            for name in (c1, c2):
                host.ctl("rm", name, check=False)


def test_published_ports_survive_a_restart() -> None:
    with running_host() as host:
        outside, host_ip, outside_ip = add_outside(host)
        c1 = unique("c1-")
        try:
            host.ctl("run", "-p", "8080:80", c1)
            rules = host.iptables_save()
            assert host.publishes(8080)
            veth = next(x for x in host.links() if x["ifname"].startswith("na"))
            assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True
            host.stop()
            host.start()
            assert host.iptables_save() == rules
            with traffic.serve(c1, tcp=[80]):
                assert traffic.tcp(outside, host_ip, 8080) == outside_ip
            host.ctl("port", "unpublish", c1, "8080:80")
            assert not host.publishes(8080)
        finally:
            host.ctl("rm", c1, check=False)
            sh("ip", "netns", "del", outside, check=False)
