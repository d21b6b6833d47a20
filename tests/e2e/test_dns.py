"""The embedded DNS server end to end: real agentd, real namespaces, real queries (dig, and
dnspython for hand-made packets), a fake upstream resolver served in a test namespace."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dns.message
import pytest

from tests.e2e.dns_peers import FakeUpstream, burst, dig, send_raw, short, status, wait_for
from tests.e2e.harness import Host, add_outside, ns_exec, sh, unique

pytestmark = pytest.mark.kernel


@dataclass
class Setup:
    host: Host
    etc: str  # agentd's --netns-etc-dir
    outside: str  # namespace of the fake upstream (10.99.0.2)
    upstream: FakeUpstream
    c1: str  # on n1, named "web", aliases "db" and "Cache"
    c2: str  # on n1, named by its namespace name
    c3: str  # on n2
    gw1: str
    gw2: str


def start_host(etc: str, upstream: str = "10.99.0.2") -> Host:
    host = Host("--dns-upstream", upstream, "--netns-etc-dir", etc)
    try:
        host.start()
    except BaseException:
        host.close()
        raise
    return host


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    etc = tempfile.mkdtemp(prefix="netagent-etc-")
    host = start_host(etc)
    outside, _, _ = add_outside(host)
    upstream = FakeUpstream(outside)
    c1, c2, c3 = unique("c1-"), unique("c2-"), unique("c3-")
    try:
        host.ctl("network", "create", "n1")
        gw1 = host.call("network.inspect", network="n1")["network"]["gateway"]
        host.ctl("network", "create", "n2")
        gw2 = host.call("network.inspect", network="n2")["network"]["gateway"]
        host.ctl("run", "--network", "n1", "--name", "web", "--alias", "db", "--alias", "Cache", c1)
        host.ctl("run", "--network", "n1", c2)
        host.ctl("run", "--network", "n2", c3)
        yield Setup(host, etc, outside, upstream, c1, c2, c3, gw1, gw2)
    finally:
        upstream.close()
        for ns in (c1, c2, c3):
            host.ctl("rm", ns, check=False)
        host.close()
        sh("ip", "netns", "del", outside, check=False)


def test_same_network_names_and_aliases_resolve(setup: Setup) -> None:
    s = setup
    ip1 = s.host.call("network.inspect", network="n1")["endpoints"]
    by_ns = {e["sandbox"]: e["ip"] for e in ip1}
    assert short(s.c2, s.gw1, "web") == [by_ns[s.c1]]
    assert short(s.c2, s.gw1, "DB.") == [by_ns[s.c1]]
    assert short(s.c2, s.gw1, "cache") == [by_ns[s.c1]]
    assert short(s.c1, s.gw1, s.c2) == [by_ns[s.c2]]  # run's default name: the namespace's
    assert short(s.c1, s.gw1, "web", "AAAA") == []  # NODATA: IPv4-only network
    assert status(s.c1, s.gw1, "web", "AAAA") == "NOERROR"
    assert short(s.c2, s.gw1, "+tcp", "web") == [by_ns[s.c1]]  # TCP too


def test_one_alias_on_two_containers_answers_both_in_turn(setup: Setup) -> None:
    s = setup
    extra = unique("rr-")
    s.host.ctl("run", "--network", "n1", "--alias", "db", extra)
    try:
        firsts = set()
        for _ in range(4):
            out = dig(s.c2, s.gw1, "+short", "db").stdout.split()
            assert len(out) == 2
            firsts.add(out[0])
        assert len(firsts) == 2  # round robin: each address leads in turn
    finally:
        s.host.ctl("rm", extra)
    assert len(short(s.c2, s.gw1, "db")) == 1


def test_ptr(setup: Setup) -> None:
    s = setup
    ip = next(
        e["ip"] for e in s.host.call("network.inspect", network="n1")["endpoints"]
        if e["sandbox"] == s.c1
    )  # fmt: skip
    assert short(s.c2, s.gw1, "-x", ip) == ["web."]


def test_another_networks_names_are_invisible(setup: Setup) -> None:
    s = setup
    # asked on its own gateway, n2 knows no "web": forwarded, the upstream says NXDOMAIN
    assert status(s.c3, s.gw2, "web") == "NXDOMAIN"
    # asked on n1's gateway from n2: no answer at all (not its subnet)
    assert status(s.c3, s.gw1, "web") is None


def test_inspect_shows_dns_and_names(setup: Setup) -> None:
    view = setup.host.call("network.inspect", network="n1")
    assert view["network"]["dns"] is True
    names = {e["sandbox"]: e["aliases"] for e in view["endpoints"]}
    assert names[setup.c1] == ["web", "db", "cache"]
    assert names[setup.c2] == [setup.c2]
    default = setup.host.call("network.inspect", network="bridge")["network"]
    assert default["dns"] is False


def test_run_writes_resolv_conf_that_the_system_resolver_uses(setup: Setup) -> None:
    s = setup
    path = os.path.join(s.etc, s.c2, "resolv.conf")
    with open(path) as f:
        assert f.read() == f"nameserver {s.gw1}\n"
    # what `ip netns exec` does with /etc/netns/NAME/resolv.conf, in a private mount namespace
    script = f"mount --bind {path} /etc/resolv.conf && dig +short +time=1 +tries=1 web"
    out = ns_exec(s.c2, "unshare", "-m", "--propagation", "private", "sh", "-c", script)
    assert out.stdout.split() == [
        e["ip"]
        for e in s.host.call("network.inspect", network="n1")["endpoints"]
        if e["sandbox"] == s.c1
    ]


def test_forwarding_and_tcp_fallback_on_truncation(setup: Setup) -> None:
    s = setup
    assert short(s.c1, s.gw1, "example.test") == ["192.0.2.7"]
    # the upstream truncates big.test over UDP: agentd asks it again over TCP, and the whole
    # answer (~700 octets) fits the client's EDNS size: one UDP exchange for the client
    out = dig(s.c1, s.gw1, "+bufsize=1232", "big.test", timeout=3).stdout
    assert "Truncated" not in out and "(UDP)" in out
    assert sum(1 for line in out.splitlines() if "\tA\t192.0.2." in line) == 40
    # the upstream truncates big.test over UDP: agentd asks it again over TCP; dig (no EDNS,
    # 512 octets) gets TC from agentd and asks agentd over TCP in turn
    out = dig(s.c1, s.gw1, "+noedns", "big.test", timeout=3).stdout
    assert "Truncated, retrying in TCP mode" in out
    assert sum(1 for line in out.splitlines() if "\tA\t192.0.2." in line) == 40
    assert short(s.c1, s.gw1, "+tcp", "big.test")[:2] == ["192.0.2.1", "192.0.2.10"]


def test_name_appears_with_connect_and_goes_with_disconnect_and_rm(setup: Setup) -> None:
    s = setup
    foreign = unique("fx-")
    sh("ip", "netns", "add", foreign)
    try:
        r = s.host.ctl("network", "connect", "--alias", "worker", "--alias", "w2", "n1", foreign)
        assert r.returncode == 0
        # the first query after connect returned already answers
        ip = next(
            e["ip"] for e in s.host.call("network.inspect", network="n1")["endpoints"]
            if e["netns"].endswith(foreign)
        )  # fmt: skip
        assert short(s.c1, s.gw1, "worker") == [ip]
        # a namespace the agent did not create: no file of it touched
        assert not os.path.exists(os.path.join(s.etc, foreign))
        s.host.ctl("network", "disconnect", "n1", foreign)
        assert status(s.c1, s.gw1, "worker") == "NXDOMAIN"  # forwarded: not ours any more
    finally:
        sh("ip", "netns", "del", foreign, check=False)
    tmp = unique("tmp-")
    s.host.ctl("run", "--network", "n1", "--name", "temp", tmp)
    assert short(s.c1, s.gw1, "temp") != []
    s.host.ctl("rm", tmp)
    assert status(s.c1, s.gw1, "temp") == "NXDOMAIN"
    assert not os.path.exists(os.path.join(s.etc, tmp))


def test_garbage_and_oversized_packets_get_nothing_and_the_server_lives(setup: Setup) -> None:
    s = setup
    query = dns.message.make_query("web", "A").to_wire()
    response = dns.message.make_response(dns.message.make_query("web", "A")).to_wire()
    garbage = [
        b"", b"\x00", b"\xff" * 11, os.urandom(12), os.urandom(300), query[:20],
        response, query[:12] + os.urandom(64), query + b"\x00" * 9000,
    ]  # fmt: skip
    replies, size = send_raw(s.c1, s.gw1, garbage)
    assert (replies, size) == (0, 0)
    # a readable query with two questions: FORMERR, no larger than what was sent
    two = bytearray(query)
    two[5] = 2
    two += query[12:]
    replies, size = send_raw(s.c1, s.gw1, [bytes(two)])
    assert replies == 1 and size <= len(two)
    assert short(s.c2, s.gw1, "web") != []
    assert s.host.proc is not None and s.host.proc.poll() is None


def test_a_burst_is_answered_query_for_query(setup: Setup) -> None:
    # many queries waiting at once are served in batches (agent/dns/udpbatch.py, or its
    # Cython twin): each cached one answered once, with its own id, to its own socket; the
    # misses among them (a forwarded name) handed back and answered too; garbage never
    s = setup
    web = next(
        e["ip"] for e in s.host.call("network.inspect", network="n1")["endpoints"]
        if e["sandbox"] == s.c1
    )  # fmt: skip
    names = ["web.", "db.", "example.test."]
    replies = burst(s.c2, s.gw1, names, per_name=25, sockets=3)
    expected = {i: names[i % 3] for i in range(75)}
    assert sorted(r[1] for r in replies) == sorted(expected)  # each once, none lost or doubled
    for sock, qid, name, rcode, addrs in replies:
        assert (sock, name, rcode) == (qid % 3, expected[qid], 0)
        assert addrs == (["192.0.2.7"] if name == "example.test." else [web])


def test_start_up_objects_are_frozen_out_of_the_collector(setup: Setup) -> None:
    # a full collection walks every object: over what start-up made it stalled the loop, and
    # every DNS answer, 11-20 ms; frozen, ~0.05 ms (docs/ARCHITECTURE.md, "Names (DNS)")
    ready = next(line for line in setup.host.log().splitlines() if "agentd.ready" in line)
    frozen = re.search(r"gc_frozen\W+(\d+)", ready)
    assert frozen is not None and int(frozen.group(1)) > 10_000, ready


def test_no_answers_on_non_agent_interfaces(setup: Setup) -> None:
    s = setup
    # the outside world reaches the host by its uplink: neither the uplink's address nor the
    # gateway's (routed to it through the uplink) answers it
    sh("ip", "-n", s.outside, "route", "replace", "172.16.0.0/12", "via", "10.99.0.1")
    assert status(s.outside, "10.99.0.1", "web") is None
    assert status(s.outside, s.gw1, "web") is None
    assert status(s.outside, s.gw1, "example.test") is None  # no open resolver either


def test_dual_stack_names_on_both_gateways() -> None:
    etc = tempfile.mkdtemp(prefix="netagent-etc-")
    host = start_host(etc)
    a, b, other = unique("a-"), unique("b-"), unique("o-")
    try:
        host.ctl("network", "create", "--ipv6", "ds")
        host.ctl("network", "create", "--ipv6", "ds2")
        net = host.call("network.inspect", network="ds")["network"]
        ep = host.call("sandbox.run", name=a, network="ds", dns_name="web")
        host.ctl("run", "--network", "ds", b)
        host.ctl("run", "--network", "ds2", other)
        assert ep["ip6"]
        gw6 = net["gateway6"]
        assert short(b, net["gateway"], "web", "AAAA") == [ep["ip6"]]
        assert short(b, gw6, "web", "AAAA") == [ep["ip6"]]
        assert short(b, gw6, "web", "A") == [ep["ip"]]
        assert short(b, gw6, "+tcp", "web", "A") == [ep["ip"]]
        assert short(b, gw6, "-x", ep["ip6"]) == ["web."]
        assert status(other, gw6, "web") is None  # another network's container: nothing
    finally:
        host.close()


def test_dns_off_networks_have_no_server() -> None:
    etc = tempfile.mkdtemp(prefix="netagent-etc-")
    host = start_host(etc)
    c = unique("q-")
    try:
        host.ctl("network", "create", "--disable-dns", "quiet")
        gw = host.call("network.inspect", network="quiet")["network"]["gateway"]
        assert host.call("network.inspect", network="quiet")["network"]["dns"] is False
        host.ctl("run", "--network", "quiet", c)
        assert status(c, gw, c) is None
        assert not os.path.exists(os.path.join(etc, c))  # the host's resolv.conf applies
        d = unique("d-")
        host.ctl("run", d)  # the default network
        assert status(d, "172.17.0.1", d) is None
    finally:
        host.close()


def test_upstream_down_is_servfail_fast() -> None:
    etc = tempfile.mkdtemp(prefix="netagent-etc-")
    # 10.99.0.2 exists but serves nothing (port unreachable); 10.99.0.3 does not exist
    for upstream, within in (("10.99.0.2", 0.5), ("10.99.0.3", 2.9)):
        host = start_host(etc, upstream)
        try:
            outside, _, _ = add_outside(host)
            host.ctl("network", "create", "n1")
            c = unique("c-")
            host.ctl("run", "--network", "n1", c)
            gw = host.call("network.inspect", network="n1")["network"]["gateway"]
            started = time.monotonic()
            assert status(c, gw, "example.test", timeout=5) == "SERVFAIL"
            assert time.monotonic() - started < within + 0.3  # dig's own start included
            sh("ip", "netns", "del", outside, check=False)
        finally:
            host.close()


def test_names_answer_as_soon_as_agentd_is_ready_after_a_restart() -> None:
    etc = tempfile.mkdtemp(prefix="netagent-etc-")
    host = start_host(etc)
    c = unique("c-")
    try:
        host.ctl("network", "create", "n1")
        gw = host.call("network.inspect", network="n1")["network"]["gateway"]
        ip = host.ctl("run", "--network", "n1", "--name", "web", c).stdout.strip()
        host.stop()
        assert status(c, gw, "web") is None  # nobody answers while agentd is down
        host.start()  # returns when agentd answers its socket
        assert short(c, gw, "web") == [ip]
    finally:
        host.close()


def test_bridge_deleted_and_recreated_is_served_again() -> None:
    etc = tempfile.mkdtemp(prefix="netagent-etc-")
    host = start_host(etc)
    c = unique("c-")
    try:
        net = host.call("network.create", name="n1")
        ip = host.ctl("run", "--network", "n1", "--name", "web", c).stdout.strip()
        assert short(c, net["gateway"], "web") == [ip]
        sh("ip", "-n", host.name, "link", "del", net["bridge"])

        def answered() -> bool:
            return short(c, net["gateway"], "web") == [ip]

        wait_for(answered, timeout=15)
    finally:
        host.close()


def test_the_gateway_mac_stays_put_as_endpoints_come_and_go(setup: Setup) -> None:
    """A bridge left to choose takes its lowest port's MAC: each connect or disconnect could
    change it, and the containers' ARP entries for their DNS server would go stale (seen as
    queries timing out after a disconnect)."""
    s = setup
    bridge = s.host.call("network.inspect", network="n1")["network"]["bridge"]

    def mac() -> str:
        return next(x["address"] for x in s.host.links() if x["ifname"] == bridge)

    before = mac()
    for _ in range(3):
        ns = unique("m-")
        s.host.ctl("run", "--network", "n1", ns)
        assert mac() == before
        s.host.ctl("rm", ns)
        assert mac() == before


def test_first_query_after_run_returns_resolves(setup: Setup) -> None:
    s = setup
    for _ in range(3):
        ns = unique("f-")
        done = s.host.ctl("run", "--network", "n1", "--name", "fresh", ns)
        try:
            assert short(s.c1, s.gw1, "fresh") == [done.stdout.strip()]
        finally:
            s.host.ctl("rm", ns)
