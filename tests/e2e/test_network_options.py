"""Network options end to end: internal, icc off, masquerade off, a user's bridge, MTU, MAC,
labels, several networks per namespace -- each checked with real traffic both ways."""

from __future__ import annotations

import ipaddress
import json

import pytest

from tests.e2e import traffic
from tests.e2e.harness import (
    add_outside,
    ipv4_of,
    links,
    ns_exec,
    ping,
    routes,
    running_host,
    sh,
    unique,
)

pytestmark = pytest.mark.kernel


def test_internal_icc_and_masquerade_options() -> None:
    with running_host() as host:
        baseline = host.iptables_save()
        outside, host_ip, outside_ip = add_outside(host)
        sh("ip", "-n", outside, "route", "add", "172.16.0.0/12", "via", host_ip)
        names = [unique(f"c{i}-") for i in range(6)]
        a1, a2, i1, i2, m1, p1 = names
        try:
            host.ctl("network", "create", "--internal", "--subnet", "172.21.0.0/24", "inet")
            host.ctl("network", "create", "-o", "icc=false", "--subnet", "172.22.0.0/24", "noicc")
            host.ctl("network", "create", "--opt", "ip-masquerade=false", "--subnet",
                     "172.23.0.0/24", "nomasq")  # fmt: skip
            for name, net in ((a1, "inet"), (a2, "inet"), (i1, "noicc"), (i2, "noicc")):
                host.ctl("run", "--network", net, name)
            host.ctl("run", "--network", "nomasq", m1)
            host.ctl("run", p1)  # default network: the control
            with traffic.serve(outside, tcp=[7777], udp=[7777]):
                # internal: members talk; no default route; nothing in or out
                assert ping(a1, "172.21.0.3")
                assert not [r for r in routes(a1) if r["dst"] == "default"]
                sh("ip", "-n", a1, "route", "add", "default", "via", "172.21.0.1")
                assert traffic.tcp(a1, outside_ip, 7777) is None
                assert traffic.udp(a1, outside_ip, 7777) is None
                assert not ping(outside, "172.21.0.2")
                assert not ping(p1, "172.21.0.2")
                # icc off: members cannot talk to each other, but traffic out works
                assert not ping(i1, "172.22.0.3")
                assert not ping(i2, "172.22.0.2")
                assert traffic.tcp(i1, outside_ip, 7777) == host_ip
                assert traffic.udp(i2, outside_ip, 7777) == host_ip
                # masquerade off: traffic out keeps the container's source
                assert traffic.tcp(m1, outside_ip, 7777) == "172.23.0.2"
                assert traffic.udp(m1, outside_ip, 7777) == "172.23.0.2"
                # the control network is masqueraded
                assert traffic.tcp(p1, outside_ip, 7777) == host_ip
        finally:
            for name in names:
                host.ctl("rm", name, check=False)
            sh("ip", "netns", "del", outside, check=False)
            sh("ip", "-n", host.name, "link", "del", "uplink0", check=False)
        for net in ("inet", "noicc", "nomasq"):
            host.ctl("network", "rm", net)
        assert host.iptables_save() == baseline


def test_existing_bridge_is_used_and_kept() -> None:
    with running_host() as host:
        sh("ip", "-n", host.name, "link", "add", "mybr0", "type", "bridge")
        c1, c2 = unique("c1-"), unique("c2-")
        try:
            host.ctl("network", "create", "--opt", "bridge=mybr0", "--subnet", "10.60.0.0/24",
                     "custom")  # fmt: skip
            assert ipv4_of(host.name, "mybr0") == ["10.60.0.1/24"]
            host.ctl("run", "--network", "custom", c1)
            host.ctl("run", "--network", "custom", c2)
            assert ping(c1, "10.60.0.3")
            assert "-o mybr0 -j DROP" in host.iptables_save() or host.backend != "iptables"
            assert host.firewall_bridges() >= {"mybr0"}
        finally:
            for name in (c1, c2):
                host.ctl("rm", name, check=False)
        host.ctl("network", "rm", "custom")
        assert "mybr0" in host.link_names()
        assert ipv4_of(host.name, "mybr0") == []
        assert "mybr0" not in host.iptables_save()
        assert "mybr0" not in host.firewall_bridges()
        # a bridge the agent made is deleted
        host.ctl("network", "create", "--opt", "bridge=agentbr0", "mine")
        assert "agentbr0" in host.link_names()
        host.ctl("network", "rm", "mine")
        assert "agentbr0" not in host.link_names()


def test_mtu_static_ip_and_mac() -> None:
    with running_host() as host:
        c1 = unique("c1-")
        try:
            net_id = host.ctl("network", "create", "--mtu", "1400", "--subnet", "10.61.0.0/24",
                              "--ip-range", "10.61.0.128/25", "small").stdout.strip()  # fmt: skip
            ep = json.loads(host.ctl("--json", "run", "--network", "small", "--mac",
                                     "02:aa:bb:cc:dd:ee", c1).stdout)  # fmt: skip
            assert ep["ip"] == "10.61.0.128"  # dynamic addresses come from --ip-range
            bridge = next(x for x in host.links() if x["ifname"] == f"br-{net_id[:12]}")
            host_end = next(x for x in host.links() if x["ifname"] == ep["host_ifname"])
            inside = next(x for x in links(c1) if x["ifname"] == "eth0")
            assert (bridge["mtu"], host_end["mtu"], inside["mtu"]) == (1400, 1400, 1400)
            assert inside["address"] == "02:aa:bb:cc:dd:ee"
            # a static address outside the range but inside the subnet is allowed
            c2 = unique("c2-")
            host.ctl("run", "--network", "small", "--ip", "10.61.0.7", c2)
            assert ipv4_of(c2, "eth0") == ["10.61.0.7/24"]
            host.ctl("rm", c2)
            for mac, words in (("01:00:5e:00:00:01", "multicast"), ("02:zz", "invalid MAC")):
                r = host.ctl("run", "--network", "small", "--mac", mac, unique("x-"), check=False)
                assert r.returncode == 5 and words in r.stderr, r.stderr
            r = host.ctl("network", "create", "--subnet", "10.62.0.0/24", "--ip-range",
                         "10.63.0.0/25", "bad", check=False)  # fmt: skip
            assert r.returncode == 5, r.stderr
        finally:
            host.ctl("rm", c1, check=False)


def test_label_filters_for_ls_and_prune() -> None:
    with running_host() as host:
        host.ctl("network", "create", "--label", "env=prod", "--label", "team=a", "p1")
        host.ctl("network", "create", "--label", "env=dev", "d1")
        host.ctl("network", "create", "plain")

        def names(*flt: str) -> set[str]:
            out = host.ctl("network", "ls", *flt).stdout.splitlines()[1:]
            return {line.split()[1] for line in out}

        assert names("--filter", "label=env") == {"p1", "d1"}
        assert names("--filter", "label=env=prod") == {"p1"}
        assert names("--filter", "label=env", "--filter", "label=team=a") == {"p1"}
        assert names("--filter", "label=nope") == set()
        assert host.ctl("network", "prune", "-f", "--filter", "label=env=dev").stdout == "d1\n"
        assert names() == {"bridge", "p1", "plain"}


def test_two_networks_in_one_namespace() -> None:
    with running_host() as host:
        host.ctl("network", "create", "--subnet", "10.70.0.0/24", "front")
        host.ctl("network", "create", "--subnet", "10.71.0.0/24", "back")
        multi, f1, b1 = unique("m-"), unique("f-"), unique("b-")
        try:
            host.ctl("run", "--network", "front", multi)
            host.ctl("network", "connect", "back", multi)
            host.ctl("run", "--network", "front", f1)
            host.ctl("run", "--network", "back", b1)
            assert ipv4_of(multi, "eth0") == ["10.70.0.2/24"]
            assert ipv4_of(multi, "eth1") == ["10.71.0.2/24"]
            defaults = [r for r in routes(multi) if r["dst"] == "default"]
            assert [(r["gateway"], r["dev"]) for r in defaults] == [("10.70.0.1", "eth0")]
            # the member of both reaches both; the others only their own network
            assert ping(multi, "10.70.0.3") and ping(multi, "10.71.0.3")
            assert ping(f1, "10.70.0.2") and ping(b1, "10.71.0.2")
            assert not ping(f1, "10.71.0.3")
            assert not ping(b1, "10.70.0.3")
            # the namespace does not route between its networks
            assert ns_exec(multi, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        finally:
            for name in (multi, f1, b1):
                host.ctl("rm", name, check=False)


def test_chosen_subnets_follow_routes_added_and_deleted_between_creates() -> None:
    """Host routes are no longer dumped per create but followed as changes: a route someone
    adds just before a create is still avoided, and one deleted is free again."""
    with running_host() as host:

        def subnet(name: str) -> str:
            host.ctl("network", "create", name)
            return host.call("network.inspect", network=name)["network"]["subnet"]

        first = ipaddress.IPv4Network(subnet("r1"))
        nxt = [ipaddress.IPv4Network((int(first.network_address) + k * first.num_addresses,
                                      first.prefixlen)) for k in (1, 2, 3)]  # fmt: skip
        sh("ip", "-n", host.name, "route", "add", "blackhole", str(nxt[0]))
        sh("ip", "-n", host.name, "route", "add", "blackhole", str(nxt[2]))
        assert subnet("r2") == str(nxt[1])  # the route added last is avoided
        sh("ip", "-n", host.name, "route", "del", "blackhole", str(nxt[2]))
        assert subnet("r3") == str(nxt[2])  # and the one deleted is free again
        for name in ("r1", "r2", "r3"):
            host.ctl("network", "rm", name)
