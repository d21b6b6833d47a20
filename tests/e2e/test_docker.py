"""`docker network create -d netagent` end to end: a real dockerd 20.10 and a real agentd in
one private "host" namespace (tests/e2e/docker_harness.py), checked with docker itself,
`ip`, `iptables-save` and real traffic."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.docker_harness import IMAGE, PLUGIN_SOCKET, Dockerd, private_mounts
from tests.e2e.harness import Host, add_outside, ns_exec, sh, unique

pytestmark = pytest.mark.kernel

#: agentd's own pools stay clear of Docker's default IPAM pools (172.17.0.0/16 ...): Docker's
#: IPAM cannot see agentd's networks while their bridges are down (no route yet)
AGENT_POOL = "10.210.0.0/16:24"
HTTPD = "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && httpd -f -p 80 -h /www"


@pytest.fixture
def env() -> Iterator[tuple[Host, Dockerd]]:
    private_mounts()
    host = Host("--docker-plugin", PLUGIN_SOCKET, "--pool", AGENT_POOL)
    dockerd = Dockerd(host)
    try:
        host.start()
        dockerd.start()
        dockerd.import_image()
        yield host, dockerd
    finally:
        dockerd.stop()
        host.close()


def inspect_network(d: Dockerd, name: str) -> dict:
    return json.loads(d.docker("network", "inspect", name).stdout)[0]


def agent_network(host: Host, net_id: str) -> dict:
    nets = host.call("network.list")
    return next(n for n in nets if n["id"] == net_id)


def container_ip(d: Dockerd, name: str, network: str) -> str:
    out = d.docker("inspect", name).stdout
    return json.loads(out)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def run(d: Dockerd, name: str, network: str, *extra: str, cmd: str = "sleep 600") -> str:
    d.docker("run", "-d", "--name", name, "--network", network, *extra, IMAGE, "sh", "-c", cmd)
    return container_ip(d, name, network)


def can_ping(d: Dockerd, name: str, ip: str) -> bool:
    """One reply within 1 s. Used for both outcomes, so a positive check is `reaches`."""
    return d.docker("exec", name, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0


def reaches(d: Dockerd, name: str, ip: str, tries: int = 5) -> bool:
    """Some reply within `tries` attempts: a loaded machine may lose the first (ARP)."""
    return any(can_ping(d, name, ip) for _ in range(tries))


GET = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except OSError:
    sys.exit(1)
"""


def wget(ns: str, url: str):
    """An HTTP GET from the namespace `ns` (static busybox's wget crashes outside a container)."""
    return ns_exec(ns, sys.executable, "-c", GET, url, check=False)


def our_links(host: Host) -> set[str]:
    return {n for n in host.link_names() if n.startswith(("na", "nb", "br-"))}


def test_network_create_with_dockers_ipam_and_netagents(env) -> None:
    host, d = env
    auto = d.docker("network", "create", "-d", "netagent", "auto").stdout.strip()
    given = d.docker(
        "network", "create", "-d", "netagent", "--subnet", "10.77.0.0/24", "--gateway",
        "10.77.0.254", "-o", "com.docker.network.driver.mtu=1400", "given",
    ).stdout.strip()  # fmt: skip
    ipam = ("--ipam-driver", "netagent")
    ours = d.docker("network", "create", "-d", "netagent", *ipam, "ours").stdout.strip()
    ours_sub = d.docker(
        "network", "create", "-d", "netagent", "--ipam-driver", "netagent",
        "--subnet", "10.88.0.0/24", "ours-sub",
    ).stdout.strip()  # fmt: skip
    for net_id, name in ((auto, "auto"), (given, "given"), (ours, "ours"), (ours_sub, "ours-sub")):
        net = agent_network(host, net_id)
        config = inspect_network(d, name)["IPAM"]["Config"][0]
        assert net["name"] == net_id[:12]
        assert net["subnet"] == config["Subnet"]
        if "Gateway" in config:  # shown when it was given
            assert net["gateway"] == config["Gateway"].split("/")[0]
        assert f"br-{net_id[:12]}" in host.link_names()
    internal = d.docker(
        "network", "create", "-d", "netagent", "--internal", "--subnet", "10.78.0.0/24", "int",
    ).stdout.strip()  # fmt: skip
    assert agent_network(host, internal)["internal"] is True
    d.docker("network", "rm", "int")
    assert agent_network(host, given)["mtu"] == 1400
    assert agent_network(host, given)["gateway"] == "10.77.0.254"
    assert agent_network(host, ours)["subnet"].startswith("10.210.")  # agentd's pools
    assert agent_network(host, ours_sub)["subnet"] == "10.88.0.0/24"
    # agentctl shows them; bad options are refused by the plugin and change nothing
    assert auto[:12] in host.ctl("network", "ls").stdout
    before = host.call("network.list")
    r = d.docker("network", "create", "-d", "netagent", "-o", "nope=1", "bad", check=False)
    assert r.returncode != 0 and "unknown network option" in r.stderr
    r = d.docker(
        "network", "create", "-d", "netagent", "--subnet", "10.77.0.0/16", "bad", check=False
    )
    assert r.returncode != 0 and "overlaps" in r.stderr
    assert host.call("network.list") == before
    for name in ("auto", "given", "ours", "ours-sub"):
        d.docker("network", "rm", name)
    assert our_links(host) == set()
    assert [n["name"] for n in host.call("network.list")] == ["bridge"]


def test_containers_ping_and_networks_are_isolated(env) -> None:
    host, d = env
    baseline = host.iptables_save()
    d.docker("network", "create", "-d", "netagent", "--subnet", "10.61.0.0/24", "n1")
    d.docker("network", "create", "-d", "netagent", "--ipam-driver", "netagent", "n2")
    a = run(d, "ca", "n1")
    b = run(d, "cb", "n1")
    c = run(d, "cc", "n2")
    assert a.startswith("10.61.0.") and b.startswith("10.61.0.") and a != b
    assert reaches(d, "ca", b) and reaches(d, "cb", a)
    assert d.docker("exec", "ca", "ping", "-c", "3", "-W", "1", "cb", check=False).returncode == 0
    assert reaches(d, "ca", "10.61.0.1")  # the gateway: agentd's bridge
    # the container's interface is Docker's eth0 with Docker's address and a default route
    addr = d.docker("exec", "ca", "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert f"{a}/24" in addr
    assert "default via 10.61.0.1" in d.docker("exec", "ca", "ip", "route").stdout
    # isolation from the other Docker network, both ways, and from agentd's own networks
    assert not can_ping(d, "ca", c) and not can_ping(d, "cc", a)
    sandbox = unique("sb")
    host.ctl("run", sandbox)
    eps = [e for e in host.call("endpoint.list") if e.get("sandbox") == sandbox]
    sb_ip = eps[0]["ip"]
    assert not can_ping(d, "ca", sb_ip)
    assert ns_exec(sandbox, "ping", "-c", "1", "-W", "1", a, check=False).returncode != 0
    host.ctl("rm", sandbox)
    # docker rm -f and network rm leave nothing of netagent behind
    d.docker("rm", "-f", "ca", "cb", "cc")
    d.docker("network", "rm", "n1", "n2")
    assert our_links(host) == set()
    assert host.call("endpoint.list") == []
    assert host.iptables_save() == baseline


def test_published_port_reached_from_outside(env) -> None:
    host, d = env
    baseline = host.iptables_save()
    outside, host_ip, _ = add_outside(host)
    try:
        d.docker("network", "create", "-d", "netagent", "--subnet", "10.62.0.0/24", "web")
        run(d, "web1", "web", "-p", "8080:80", "--hostname", "web1", cmd=HTTPD)
        url = f"http://{host_ip}:8080/index.html"
        deadline = time.monotonic() + 10
        got = ""
        while time.monotonic() < deadline and "hello" not in got:
            got = wget(outside, url).stdout
            time.sleep(0.1)
        assert got.strip() == "hello-from-web1"
        assert host.publishes(8080)  # the DNAT, whichever the backend
        d.docker("rm", "-f", "web1")
        assert wget(outside, url).returncode != 0
        assert not host.publishes(8080)
        d.docker("network", "rm", "web")
        assert host.iptables_save() == baseline
    finally:
        sh("ip", "netns", "del", outside, check=False)


def test_network_connect_and_disconnect(env) -> None:
    host, d = env
    d.docker("network", "create", "-d", "netagent", "--subnet", "10.63.0.0/24", "m1")
    d.docker("network", "create", "-d", "netagent", "--subnet", "10.64.0.0/24", "m2")
    run(d, "cx", "m1")
    y = run(d, "cy", "m2")
    assert not can_ping(d, "cx", y)
    d.docker("network", "connect", "m2", "cx")
    x2 = container_ip(d, "cx", "m2")
    assert x2.startswith("10.64.0.")
    assert f"{x2}/24" in d.docker("exec", "cx", "ip", "-o", "-4", "addr", "show", "eth1").stdout
    assert reaches(d, "cx", y) and reaches(d, "cy", x2)
    assert len(host.call("endpoint.list")) == 3
    d.docker("network", "disconnect", "m2", "cx")
    assert not can_ping(d, "cx", y)
    assert "eth1" not in d.docker("exec", "cx", "ip", "-o", "link").stdout
    assert len(host.call("endpoint.list")) == 2
    d.docker("rm", "-f", "cx", "cy")
    d.docker("network", "rm", "m1", "m2")
    assert our_links(host) == set()


@pytest.mark.parametrize("how", ["restart", "kill-9"])
def test_agentd_restart_keeps_containers_connected(env, how: str) -> None:
    host, d = env
    baseline = host.iptables_save()
    d.docker("network", "create", "-d", "netagent", "--subnet", "10.65.0.0/24", "r1")
    p = run(d, "cp", "r1")
    q = run(d, "cq", "r1")
    assert reaches(d, "cp", q)
    endpoints = sorted(e["id"] for e in host.call("endpoint.list"))
    host.stop(9 if how == "kill-9" else 15)
    assert reaches(d, "cp", q)  # the kernel keeps forwarding while agentd is away
    host.start()
    assert sorted(e["id"] for e in host.call("endpoint.list")) == endpoints
    assert reaches(d, "cp", q) and reaches(d, "cq", p)
    d.docker("restart", "-t", "0", "cq")  # a new endpoint, likely with the same address
    q = container_ip(d, "cq", "r1")
    assert reaches(d, "cp", q) and len(host.call("endpoint.list")) == 2
    # Docker's later Leave/DeleteEndpoint/DeleteNetwork find what they name
    d.docker("rm", "-f", "cp")
    assert len(host.call("endpoint.list")) == 1
    d.docker("rm", "-f", "cq")
    d.docker("network", "rm", "r1")
    assert our_links(host) == set()
    assert host.call("endpoint.list") == []
    assert host.iptables_save() == baseline


def test_ipv6_dual_stack_network(env) -> None:
    host, d = env
    baseline = host.iptables_save()
    d.docker(
        "network", "create", "-d", "netagent", "--ipv6", "--subnet", "10.70.0.0/24",
        "--subnet", "fd00:70::/64", "v6",
    )  # fmt: skip
    net = next(n for n in host.call("network.list") if n["name"] != "bridge")
    assert (net["ipv6"], net["subnet6"], net["gateway6"]) == (True, "fd00:70::/64", "fd00:70::1")
    run(d, "s1", "v6")
    run(d, "s2", "v6")
    s2 = json.loads(d.docker("inspect", "s2").stdout)[0]["NetworkSettings"]["Networks"]["v6"]
    assert {e["ip6"] for e in host.call("endpoint.list")} >= {s2["GlobalIPv6Address"]}
    assert "default via fd00:70::1" in d.docker("exec", "s1", "ip", "-6", "route").stdout
    ping6 = ("exec", "s1", "ping", "-6", "-c", "3", "-W", "2")
    assert d.docker(*ping6, s2["GlobalIPv6Address"], check=False).returncode == 0
    assert d.docker(*ping6, "fd00:70::1", check=False).returncode == 0
    d.docker("rm", "-f", "s1", "s2")
    d.docker("network", "rm", "v6")
    assert our_links(host) == set()
    assert host.iptables_save() == baseline
