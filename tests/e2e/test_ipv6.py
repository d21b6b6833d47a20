"""IPv6 dual stack end to end: addresses without DAD, ping -6 and TCP/UDP echo over IPv6
between members, from the host and to an "outside" namespace (masqueraded), isolation between
networks, published ports over IPv6, and the ip6tables ruleset back to its baseline after
teardown. Every address is a ULA of namespaces made here."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from tests.e2e import traffic
from tests.e2e.harness import (
    add_outside,
    addrs,
    netns_names,
    ns_exec,
    routes,
    running_host,
    sh,
    unique,
)

pytestmark = pytest.mark.kernel

HOST6, OUTSIDE6 = "fd99::1", "fd99::2"


def ip6tables_save(host) -> str:
    out = ns_exec(host.name, "ip6tables-save").stdout
    return "\n".join(
        line for line in out.splitlines() if line and not line.startswith("#")
    ).replace("[0:0]", "")


def ping6(src: str, dst: str) -> bool:
    return ns_exec(src, "ping", "-6", "-c", "1", "-W", "1", "-q", dst, check=False).returncode == 0


def ipv6_of(ns: str, ifname: str) -> list[dict]:
    return [
        a
        for link in addrs(ns)
        if link["ifname"] == ifname
        for a in link["addr_info"]
        if a["family"] == "inet6" and a.get("scope") == "global"
    ]


def add_outside6(host) -> tuple[str, str]:
    outside, _, _ = add_outside(host)
    sh("ip", "-n", host.name, "addr", "add", f"{HOST6}/64", "dev", "uplink0", "nodad")
    sh("ip", "-n", outside, "addr", "add", f"{OUTSIDE6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", outside, "route", "add", "fd00::/8", "via", HOST6)
    return outside, HOST6


def test_dual_stack_traffic_isolation_masquerade_and_teardown() -> None:
    with running_host() as host:
        base4, base6 = host.iptables_save(), ip6tables_save(host)
        outside, host_ip6 = add_outside6(host)
        c1, c2, c3 = (unique(f"c{i}-") for i in range(3))
        try:
            host.ctl("network", "create", "--ipv6", "v6a")
            host.ctl("network", "create", "--ipv6", "--subnet", "10.70.0.0/24",
                     "--subnet", "fd70:0:0:1::/64", "v6b")  # fmt: skip
            net = json.loads(host.ctl("network", "inspect", "v6a").stdout)[0]["network"]
            sub = ipaddress.IPv6Network(net["subnet6"])
            assert sub.prefixlen == 64 and sub.subnet_of(ipaddress.IPv6Network("fd00::/8"))
            assert net["gateway6"] == str(sub.network_address + 1)
            for name, n in ((c1, "v6a"), (c2, "v6a"), (c3, "v6b")):
                host.ctl("run", "--network", n, name)
            eps = {e["netns"].rsplit("/", 1)[-1]: e for e in json.loads(
                host.ctl("ps", "--json").stdout)}  # fmt: skip
            ip1, ip2, ip3 = (eps[c]["ip6"] for c in (c1, c2, c3))
            assert (ip1, ip2) == (str(sub.network_address + 2), str(sub.network_address + 3))
            assert ip3 == "fd70:0:0:1::2"
            # no DAD: addresses usable at once, on the bridge and in the namespace
            found = ipv6_of(c1, "eth0")
            assert [a["local"] for a in found] == [ip1]
            assert not found[0].get("tentative")
            bridge = net["bridge"]
            assert [a["local"] for a in ipv6_of(host.name, bridge)] == [net["gateway6"]]
            default6 = json.loads(sh("ip", "-6", "-n", c1, "-j", "route", "show", "default").stdout)
            assert [r["gateway"] for r in default6] == [net["gateway6"]]
            assert routes(c1)  # IPv4 still there
            # members, host and gateway reach each other over IPv6
            assert ping6(c1, ip2) and ping6(c2, ip1)
            assert ping6(host.name, ip1) and ping6(c1, net["gateway6"])
            with traffic.serve(c2, tcp=[7000], udp=[7000], v6=True):
                assert traffic.tcp(c1, ip2, 7000) == ip1
                assert traffic.udp(c1, ip2, 7000) == ip1
                assert traffic.tcp(host.name, ip2, 7000) == net["gateway6"]
                # isolation between networks, both ways
                assert traffic.tcp(c3, ip2, 7000) is None
            assert not ping6(c3, ip1) and not ping6(c1, ip3)
            # out through the host, masqueraded; nothing comes in unasked
            with traffic.serve(outside, tcp=[7777], udp=[7777], v6=True):
                assert traffic.tcp(c1, OUTSIDE6, 7777) == host_ip6
                assert traffic.udp(c3, OUTSIDE6, 7777) == host_ip6
            assert not ping6(outside, ip1)
        finally:
            for name in (c1, c2, c3):
                host.ctl("rm", name, check=False)
            sh("ip", "netns", "del", outside, check=False)
            sh("ip", "-n", host.name, "link", "del", "uplink0", check=False)
        host.ctl("network", "rm", "v6a", "v6b")
        assert ip6tables_save(host) == base6
        assert host.iptables_save() == base4


def test_published_ports_over_ipv6() -> None:
    with running_host() as host:
        base6 = ip6tables_save(host)
        outside, _ = add_outside6(host)
        w1, w2 = unique("w1-"), unique("w2-")
        try:
            host.ctl("network", "create", "--ipv6", "web6")
            host.ctl("run", "--network", "web6", "-p", "8080:80", "-p", "8081:81/udp",
                     "-p", f"[{HOST6}]:8082:82", "-p", "10.99.0.1:8083:83", w1)  # fmt: skip
            host.ctl("run", "--network", "web6", w2)
            eps = {e["netns"].rsplit("/", 1)[-1]: e for e in json.loads(
                host.ctl("ps", "--json").stdout)}  # fmt: skip
            ip1, ip2 = eps[w1]["ip6"], eps[w2]["ip6"]
            gw6 = json.loads(host.ctl("network", "inspect", "web6").stdout)[0]["network"][
                "gateway6"
            ]
            with traffic.serve(w1, tcp=[80, 82, 83], udp=[81], v6=True):
                # from outside, through the host's IPv6 address, source kept
                assert traffic.tcp(outside, HOST6, 8080) == OUTSIDE6
                assert traffic.udp(outside, HOST6, 8081) == OUTSIDE6
                # host address decides the family
                assert traffic.tcp(outside, HOST6, 8082) == OUTSIDE6
                assert traffic.tcp(outside, "10.99.0.1", 8082) is None
                assert traffic.tcp(outside, HOST6, 8083) is None
                assert traffic.tcp(outside, "10.99.0.1", 8083) == "::ffff:10.99.0.2"
                # the IPv4 side of the same mapping still works
                assert traffic.tcp(outside, "10.99.0.1", 8080) == "::ffff:10.99.0.2"
                # from the host, a neighbour, and the container itself (hairpin)
                assert traffic.tcp(host.name, HOST6, 8080) is not None
                assert traffic.tcp(w2, HOST6, 8080) == ip2
                assert traffic.tcp(w1, HOST6, 8080) == gw6
                # straight to the container, not DNATed: dropped
                assert traffic.tcp(outside, ip1, 80) is None
                host.ctl("port", "unpublish", w1, "8080:80")
                assert traffic.tcp(outside, HOST6, 8080) is None
                assert traffic.udp(outside, HOST6, 8081) == OUTSIDE6
        finally:
            for name in (w1, w2):
                host.ctl("rm", name, check=False)
            sh("ip", "netns", "del", outside, check=False)
            sh("ip", "-n", host.name, "link", "del", "uplink0", check=False)
        host.ctl("network", "rm", "web6")
        assert ip6tables_save(host) == base6


def test_static_ip6_and_bad_input_change_nothing() -> None:
    with running_host() as host:
        host.ctl("network", "create", "--ipv6", "--subnet", "fd71:0:0:1::/64", "six")
        host.ctl("network", "create", "--subnet", "10.72.0.0/24", "four")
        s1 = unique("s1-")
        host.ctl("run", "--network", "six", "--ip6", "fd71:0:0:1::99", s1)
        assert [a["local"] for a in ipv6_of(s1, "eth0")] == ["fd71:0:0:1::99"]
        state = (
            host.ctl("network", "ls", "--json").stdout,
            host.ctl("ps", "--json").stdout,
            host.iptables_save(),
            ip6tables_save(host),
            host.link_names(),
        )
        bad = unique("bad-")
        cases = [
            (5, "host bits", ["network", "create", "--ipv6", "--subnet", "fd00::1/64", "x"]),
            (5, "/120", ["network", "create", "--ipv6", "--subnet", "fd72::/124", "x"]),
            (5, "/16", ["network", "create", "--ipv6", "--subnet", "fd00::/8", "x"]),
            (5, "needs --ipv6", ["network", "create", "--subnet", "fd72::/64", "x"]),
            (5, "not a host address",
             ["network", "create", "--ipv6", "--subnet", "fd72::/64", "--gateway", "fd73::1", "x"]),
            (4, "overlaps", ["network", "create", "--ipv6", "--subnet", "fd71::/48", "x"]),
            (2, "twice for IPv4",
             ["network", "create", "--ipv6", "--subnet", "10.1.0.0/24", "--subnet", "10.2.0.0/24",
              "x"]),
            (5, "not inside", ["run", "--network", "six", "--ip6", "fd71:0:0:2::5", bad]),
            (4, "already in use", ["run", "--network", "six", "--ip6", "fd71:0:0:1::99", bad]),
            (5, "reserved", ["run", "--network", "six", "--ip6", "fd71:0:0:1::1", bad]),
            (5, "invalid IPv6", ["run", "--network", "six", "--ip6", "10.0.0.1", bad]),
            (5, "not IPv6-enabled", ["run", "--network", "four", "--ip6", "fd71::5", bad]),
            (5, "not IPv6-enabled", ["run", "--network", "four", "-p", "[fd71::1]:80:80", bad]),
        ]  # fmt: skip
        for code, text, argv in cases:
            r = host.ctl(*argv, check=False)
            assert (r.returncode, text in r.stderr) == (code, True), (argv, r.stderr)
        assert bad not in netns_names()
        assert state == (
            host.ctl("network", "ls", "--json").stdout,
            host.ctl("ps", "--json").stdout,
            host.iptables_save(),
            ip6tables_save(host),
            host.link_names(),
        )
        host.ctl("rm", s1)


def test_restart_keeps_ipv6_and_gateway6_is_restored() -> None:
    with running_host() as host:
        c1, c2 = unique("r1-"), unique("r2-")
        host.ctl("network", "create", "--ipv6", "keep")
        host.ctl("run", "--network", "keep", c1)
        net = json.loads(host.ctl("network", "inspect", "keep").stdout)[0]["network"]
        host.stop()
        host.start()
        host.ctl("network", "create", "--ipv6", "more")
        more = json.loads(host.ctl("network", "inspect", "more").stdout)[0]["network"]
        # the same host /48 after a restart: the next /64 of it
        sub, sub2 = ipaddress.IPv6Network(net["subnet6"]), ipaddress.IPv6Network(more["subnet6"])
        assert sub2.supernet(new_prefix=48) == sub.supernet(new_prefix=48) and sub2 != sub
        host.ctl("run", "--network", "keep", c2)
        ip2 = json.loads(host.ctl("ps", "--json").stdout)
        ip6s = sorted(e["ip6"] for e in ip2 if e["network_id"] == net["id"])
        assert ip6s == [str(sub.network_address + 2), str(sub.network_address + 3)]
        assert ping6(c2, ip6s[0])
        # self-healing: the gateway's IPv6 address removed by hand comes back
        gw6 = f"{net['gateway6']}/64"
        sh("ip", "-n", host.name, "addr", "del", gw6, "dev", net["bridge"])
        for _ in range(50):
            if [a["local"] for a in ipv6_of(host.name, net["bridge"])] == [net["gateway6"]]:
                break
            time.sleep(0.1)
        assert [a["local"] for a in ipv6_of(host.name, net["bridge"])] == [net["gateway6"]]
        for name in (c1, c2):
            host.ctl("rm", name)


def test_reconcile_restores_a_removed_ipv6_gateway() -> None:
    """The resync (`agentctl reconcile`, and after lost events) checks IPv6 gateways too."""
    with running_host("--repair", "manual") as host:
        host.ctl("network", "create", "--ipv6", "six")
        net = json.loads(host.ctl("network", "inspect", "six").stdout)[0]["network"]
        assert host.ctl("reconcile").stdout.strip() == "nothing to repair"
        prefix = ipaddress.IPv6Network(net["subnet6"]).prefixlen
        sh(
            "ip",
            "-n",
            host.name,
            "addr",
            "del",
            f"{net['gateway6']}/{prefix}",
            "dev",
            net["bridge"],
        )
        time.sleep(0.3)
        assert ipv6_of(host.name, net["bridge"]) == []  # manual: nothing repaired by itself
        out = host.ctl("reconcile").stdout
        assert net["bridge"] in out
        assert [a["local"] for a in ipv6_of(host.name, net["bridge"])] == [net["gateway6"]]
        assert host.ctl("reconcile").stdout.strip() == "nothing to repair"


def test_a_namespace_with_ipv6_disabled_gets_ipv4_only() -> None:
    """As Docker: no IPv6 address or route for a container whose namespace disables IPv6, and
    its address stays in the pool; asking for a given IPv6 address is refused, changing nothing.
    """
    with running_host() as host:
        off, on = unique("v6off-"), unique("v6on-")
        sh("ip", "netns", "add", off)
        sh("ip", "netns", "add", on)
        try:
            ns_exec(off, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            host.ctl("network", "create", "--ipv6", "dual")
            net = json.loads(host.ctl("network", "inspect", "dual").stdout)[0]["network"]
            first6 = str(ipaddress.IPv6Network(net["subnet6"]).network_address + 2)
            before = (host.link_names(), ip6tables_save(host))
            refused = host.ctl("network", "connect", "--ip6", first6, "dual", off, check=False)
            assert refused.returncode != 0 and "IPv6 disabled" in refused.stderr
            assert (host.link_names(), ip6tables_save(host)) == before
            host.ctl("network", "connect", "dual", off)
            (ep,) = json.loads(host.ctl("ps", "--json").stdout)
            assert ep["ip6"] is None and ep["ip"]
            assert ipv6_of(off, "eth0") == []
            assert json.loads(sh("ip", "-6", "-n", off, "-j", "route", "show").stdout) == []
            assert (
                sh("ip", "netns", "exec", off, "ping", "-c1", "-W1", net["gateway"]).returncode == 0
            )
            # the IPv6 address it was not given is free: another namespace can have it
            host.ctl("network", "connect", "--ip6", first6, "dual", on)
            mine = [
                e for e in json.loads(host.ctl("ps", "--json").stdout) if e["netns"].endswith(on)
            ]
            assert [e["ip6"] for e in mine] == [first6]
            assert ping6(on, net["gateway6"])
            host.ctl("network", "disconnect", "dual", off)
            host.ctl("network", "disconnect", "dual", on)
        finally:
            sh("ip", "netns", "del", off, check=False)
            sh("ip", "netns", "del", on, check=False)


def test_an_ipv4_only_endpoint_has_no_ipv6_and_a_dual_stack_one_keeps_it() -> None:
    """As with Docker (26+), a container's interface to an IPv4-only network has no IPv6 (no
    link-local address, no DAD/MLD traffic: no address generation, where Docker disables IPv6);
    its interface to a dual-stack network keeps it."""

    def sysctl(ns: str, key: str) -> str:
        return sh("ip", "netns", "exec", ns, "sysctl", "-n", key).stdout.strip()

    with running_host() as host:
        c = unique("v4only-")
        try:
            host.ctl("network", "create", "--ipv6", "dual")
            host.ctl("run", "--network", "bridge", c)
            host.ctl("network", "connect", "dual", c)
            assert sysctl(c, "net.ipv6.conf.eth0.addr_gen_mode") == "1"  # none
            assert sysctl(c, "net.ipv6.conf.eth1.addr_gen_mode") == "0"
            v6 = {link["ifname"]: link["addr_info"] for link in json.loads(
                sh("ip", "-6", "-n", c, "-j", "addr", "show").stdout)}  # fmt: skip
            assert not v6.get("eth0")
            assert {a["scope"] for a in v6["eth1"]} == {"global", "link"}
            net = json.loads(host.ctl("network", "inspect", "dual").stdout)[0]["network"]
            assert ping6(c, net["gateway6"])
        finally:
            host.ctl("rm", c, check=False)
