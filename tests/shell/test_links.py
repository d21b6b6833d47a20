"""The kernel shell (`agent.kernel.client` through the worker, and `ops` directly) against the
real kernel (private netns), checked with `ip -j`."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import trio
from msgspec.structs import astuple

from agent.core import naming
from agent.core.attach import Attachment, Bridge
from agent.core.errors import Conflict, KernelError, NotFound
from agent.kernel import netns, rtnl, rtsocket
from agent.kernel.client import Kernel, open_kernel
from agent.kernel.jobs import Job
from agent.kernel.netns import NSID_FLOOR, NSID_TOP
from agent.kernel.ops import JOBS, Ops

pytestmark = pytest.mark.kernel

GROUP = str(naming.LINK_GROUP)
_counter = itertools.count()


def ip_json(*args: str, ns: str | None = None) -> list[dict]:
    """`ip -j ARGS`, inside namespace file `ns` (any nsfs path) when given."""
    prefix = ["nsenter", f"--net={ns}"] if ns else []
    out = subprocess.run([*prefix, "ip", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout or "[]")


def link(name: str, ns: str | None = None) -> dict | None:
    found = [x for x in ip_json("-d", "link", "show", ns=ns) if x["ifname"] == name]
    return found[0] if found else None


def add_foreign(name: str, ns: str | None = None) -> None:
    """A veth pair `name` <-> `name`p (no dummy module here): a non-bridge link we don't own."""
    prefix = ["nsenter", f"--net={ns}"] if ns else []
    cmd = ["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name[:13]}p"]
    subprocess.run([*prefix, *cmd], check=True)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


class Scratch:
    """Unique names for one test, and their removal afterwards."""

    def __init__(self) -> None:
        self.links: list[str] = []
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def name(self, prefix: str) -> str:
        name = f"{prefix}{next(_counter)}"
        self.links.append(name)
        return name

    def ip_netns(self) -> str:
        name = f"tl{next(_counter)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        return f"/run/netns/{name}"

    async def named(self) -> str:
        name = f"tl{next(_counter)}"
        self.namespaces.append(name)
        return await netns.create_named(name)

    def process_ns(self) -> str:
        proc = subprocess.Popen(["unshare", "-n", "sleep", "30"])
        self.procs.append(proc)
        path = f"/proc/{proc.pid}/ns/net"
        for _ in range(200):  # until unshare has exec'd sleep in its new namespace
            if run("readlink", path).stdout != run("readlink", "/proc/self/ns/net").stdout:
                return path
            time.sleep(0.005)
        raise AssertionError("unshare -n did not start")

    def cleanup(self) -> None:
        for name in self.links:
            run("ip", "link", "del", name)
        for name in self.namespaces:
            run("ip", "netns", "del", name)
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    s = Scratch()
    yield s
    s.cleanup()


@pytest.fixture
async def kernel() -> AsyncIterator[Kernel]:
    async with open_kernel() as k:
        yield k


class OwnerThread:
    """The worker's `Ops` run by one dedicated thread of this process, as the worker's owner
    thread runs it: `owner(job, *args)` runs `JOBS[job]` there and returns its result."""

    def __init__(self) -> None:
        self.ops = Ops()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="test-owner")

    def __call__(self, job: Job, *args: Any) -> Any:
        return self._thread.submit(JOBS[job], self.ops, *args).result()

    def close(self) -> None:
        self(Job.CLOSE)
        self._thread.shutdown()


@pytest.fixture
def owner() -> Iterator[OwnerThread]:
    thread = OwnerThread()
    thread(Job.OPEN)
    yield thread
    thread.close()


def ident() -> str:
    return secrets.token_hex(32)


async def make_bridge(kernel: Kernel, scratch: Scratch, address: str = "172.18.0.1/16") -> str:
    name = scratch.name("tbr")
    await kernel.ensure_bridge(Bridge(name, naming.bridge_alias(ident()), address))
    return name


def endpoint(bridge: str, host: str, n: int, ns: str, **over: Any) -> Attachment:
    spec = dict(
        netns=ns, bridge=bridge, host_ifname=host, alias=naming.veth_alias(ident()),
        ifname="eth0", mac=f"02:42:ac:12:00:{n:02x}", mtu=1450, address=f"172.18.0.{n}/16",
        gateway="172.18.0.1",
    )  # fmt: skip
    spec.update(over)
    return Attachment(**spec)


# --- bridges ---------------------------------------------------------------------------------


async def test_ensure_bridge_creates_down_bridge_with_address_alias_group(kernel, scratch):
    name = scratch.name("tbr")
    alias = naming.bridge_alias(ident())
    index = await kernel.ensure_bridge(Bridge(name, alias, "172.18.0.1/16", mtu=1400))
    info = link(name)
    assert info is not None
    assert (info["ifindex"], info["linkinfo"]["info_kind"]) == (index, "bridge")
    assert info["ifalias"] == alias and info["group"] == GROUP and info["mtu"] == 1400
    assert "UP" not in info["flags"] and info["operstate"] == "DOWN"
    addrs = ip_json("addr", "show", "dev", name)[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        ("172.18.0.1", 16)
    ]


async def test_ensure_bridge_adopts_idempotently(kernel, scratch):
    name = scratch.name("tbr")
    alias = naming.bridge_alias(ident())
    first = await kernel.ensure_bridge(Bridge(name, alias, "172.19.0.1/16"))
    second = await kernel.ensure_bridge(Bridge(name, alias, "172.19.0.1/16"))
    assert first == second
    assert len([x for x in ip_json("link", "show") if x["ifname"] == name]) == 1
    inet = [
        a for a in ip_json("addr", "show", "dev", name)[0]["addr_info"] if a["family"] == "inet"
    ]
    assert len(inet) == 1


async def test_ensure_bridge_on_foreign_link_conflicts(kernel, scratch):
    name = scratch.name("tdm")
    add_foreign(name)
    with pytest.raises(Conflict, match="veth"):
        await kernel.ensure_bridge(Bridge(name, naming.bridge_alias(ident()), "10.9.0.1/24"))
    assert link(name)["linkinfo"]["info_kind"] == "veth"
    assert ip_json("addr", "show", "dev", name)[0]["addr_info"] == []


async def test_delete_bridge(kernel, scratch):
    name = await make_bridge(kernel, scratch)
    assert await kernel.delete_bridge(Bridge(name)) is True
    assert link(name) is None
    assert await kernel.delete_bridge(Bridge(name)) is False


# --- attach ----------------------------------------------------------------------------------


def assert_attached(ns: str, spec: dict, bridge: str) -> None:
    inside = {x["ifname"]: x for x in ip_json("addr", "show", ns=ns)}
    eth0 = inside["eth0"]
    assert eth0["address"] == spec.mac and eth0["mtu"] == spec.mtu
    assert "UP" in eth0["flags"] and "UP" in inside["lo"]["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["family"] == "inet"]
    local, prefix = spec.address.split("/")
    assert inet == [(local, int(prefix))]
    routes = ip_json("route", "show", "default", ns=ns)
    assert [(r["gateway"], r["dev"]) for r in routes] == [(spec.gateway, "eth0")]
    host = link(spec.host_ifname)
    assert host["master"] == bridge and "UP" in host["flags"] and host["mtu"] == spec.mtu
    assert host["ifalias"] == spec.alias and host["group"] == GROUP
    assert host["linkinfo"]["info_kind"] == "veth"
    assert "UP" in link(bridge)["flags"]
    # one queue each way at both ends, born so (no cut to one on the live device, see rtnl)
    peer = link(spec.ifname, ns=ns)
    for end in (host, peer):
        assert (end["num_tx_queues"], end["num_rx_queues"]) == (1, 1)


@pytest.mark.parametrize("kind", ["ip_netns", "named", "process"])
async def test_attach_configures_both_ends(kernel, scratch, kind):
    ns = {"ip_netns": scratch.ip_netns, "process": scratch.process_ns}.get(kind)
    path = ns() if ns else await scratch.named()
    bridge = await make_bridge(kernel, scratch)
    spec = endpoint(bridge, scratch.name("tve"), 2, path)
    await kernel.attach(spec)
    assert_attached(path, spec, bridge)
    assert await kernel.ifnames_in(path) == {"lo", "eth0"}
    # what CNI's CHECK reads: the interface's addresses inside, None once it is gone
    assert await kernel.addresses_in(path, "eth0") == [spec.address]
    assert await kernel.addresses_in(path, "eth9") is None


def test_the_creation_echo_names_the_peer_inside(scratch):
    # the namespace side of an attach needs no lookup: the echo carries the peer's ifindex
    ns, host = scratch.ip_netns(), scratch.name("tve")
    rt = rtsocket.RtSocket()
    fd = os.open(ns, os.O_RDONLY)
    try:
        request = rtnl.new_veth(
            name=host, master=0, group=naming.LINK_GROUP, mtu=1500, peer="eth0",
            peer_mac="02:42:ac:12:00:09", netns_fd=fd,
        )  # fmt: skip
        [echo] = [rtsocket.Link(payload) for payload in rtsocket.check(rt.transact([request])[0])]
    finally:
        os.close(fd)
        rt.close()
    assert echo.name == host and echo.link == link("eth0", ns=ns)["ifindex"]


def test_without_the_echo_the_peer_is_looked_up(owner, scratch, monkeypatch):
    # an older kernel that does not echo a created link: the attach still completes, by a
    # lookup of the peer inside (in this process: the patches reach the code they patch)
    made, get_link, looked_up = rtnl.new_veth, rtnl.get_link, []

    def no_echo(**kw):
        kind, flags, body = made(**kw)
        return kind, flags & ~rtnl.NLM_F_ECHO, body

    def spy(name):
        looked_up.append(name)
        return get_link(name)

    monkeypatch.setattr(rtnl, "new_veth", no_echo)
    monkeypatch.setattr(rtnl, "get_link", spy)
    bridge = scratch.name("tbr")
    owner(Job.ENSURE_BRIDGE, astuple(Bridge(bridge, naming.bridge_alias(ident()), "172.18.0.1/16")))
    path = scratch.ip_netns()
    spec = endpoint(bridge, scratch.name("tve"), 2, path)
    assert owner(Job.ATTACH, astuple(spec)) is True
    assert looked_up.count("eth0") == 1
    assert_attached(path, spec, bridge)


def nsids() -> dict[str, int]:
    """Namespace name -> its id in this namespace."""
    return {x["name"]: x["nsid"] for x in ip_json("netns", "list-id") if "name" in x}


async def test_namespace_ids_count_down_across_restarts(kernel, scratch):
    # the kernel finds a namespace's id by an ascending scan: the newest goes first
    bridge = await make_bridge(kernel, scratch)
    first, second = scratch.ip_netns(), scratch.ip_netns()
    await kernel.attach(endpoint(bridge, scratch.name("tve"), 2, first))
    await kernel.attach(endpoint(bridge, scratch.name("tve"), 3, second))
    ids = nsids()
    a, b = (ids[path.rsplit("/", 1)[1]] for path in (first, second))
    assert NSID_FLOOR <= b < a <= NSID_TOP
    # a namespace with an id already keeps it (a second network, or someone else's id)
    other = await make_bridge(kernel, scratch, "172.19.0.1/16")
    await kernel.attach(endpoint(other, scratch.name("tve"), 4, first, ifname="eth1", gateway=None))
    assert nsids()[first.rsplit("/", 1)[1]] == a
    async with open_kernel() as again:  # a restart goes on below the lowest
        third = scratch.ip_netns()
        await again.attach(endpoint(bridge, scratch.name("tve"), 5, third))
    assert NSID_FLOOR <= nsids()[third.rsplit("/", 1)[1]] < b


async def test_two_namespaces_on_one_bridge_ping(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    a, b = scratch.ip_netns(), await scratch.named()
    await kernel.attach(endpoint(bridge, scratch.name("tve"), 2, a))
    await kernel.attach(endpoint(bridge, scratch.name("tve"), 3, b))
    name_a = a.rsplit("/", 1)[1]
    ping = run("ip", "netns", "exec", name_a, "ping", "-c1", "-W1", "172.18.0.3")
    assert ping.returncode == 0, ping.stdout + ping.stderr


def ipv6_disabled(ifname: str) -> bool:
    with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6") as f:
        return f.read().strip() == "1"


def ns_sysctl(ns: str, key: str) -> str:
    name = ns.rsplit("/", 1)[1]
    return run("ip", "netns", "exec", name, "sysctl", "-n", key).stdout.strip()


def test_a_read_only_proc_sys_costs_only_a_warning(scratch):
    """disable_ipv6 is best effort: with /proc/sys read-only (a bind mount, in a child's own
    mount namespace) the write fails, one warning is logged for two tries, and nothing raises."""
    bridge = scratch.name("tbr")
    run("ip", "link", "add", bridge, "type", "bridge").check_returncode()
    try:
        script = (
            "from agent.kernel import sysctl; "
            f"sysctl.disable_ipv6({bridge!r}); sysctl.disable_ipv6({bridge!r}); print('went on')"
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys"
             f' && exec {sys.executable} -c "{script}"'],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "went on" in done.stdout
        assert (done.stdout + done.stderr).count("veth.disable_ipv6.failed") == 1
        assert not ipv6_disabled(bridge)
    finally:
        run("ip", "link", "del", bridge)


async def test_ports_and_ipv4_only_bridges_carry_no_ipv6(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    dual = scratch.name("tbr")
    await kernel.ensure_bridge(
        Bridge(dual, naming.bridge_alias(ident()), "172.19.0.1/16", "fd00:1::1/64")
    )
    ns, host = scratch.ip_netns(), scratch.name("tve")
    await kernel.attach(endpoint(bridge, host, 2, ns))
    assert ipv6_disabled(host) and ipv6_disabled(bridge) and not ipv6_disabled(dual)
    for name in (host, bridge):  # no link-local address, so no per-port IPv6 routes
        assert not any(link["addr_info"] for link in ip_json("-6", "addr", "show", "dev", name))
    # nor does the container's interface of an IPv4-only endpoint (no address generated)
    eth0_v6 = ip_json("-6", "addr", "show", "dev", "eth0", ns=ns)
    assert not any(link.get("addr_info") for link in eth0_v6)
    assert ns_sysctl(ns, "net.ipv6.conf.eth0.addr_gen_mode") == "1"  # none
    # a dual-stack endpoint's interface keeps it: its address and its link-local one
    ns6 = scratch.ip_netns()
    six = endpoint(dual, scratch.name("tve"), 4, ns6, address="172.19.0.4/16",
                   gateway="172.19.0.1", address6="fd00:1::4/64", gateway6="fd00:1::1")  # fmt: skip
    await kernel.attach(six)
    [eth0] = ip_json("-6", "addr", "show", "dev", "eth0", ns=ns6)
    assert {a["local"] for a in eth0["addr_info"]} >= {"fd00:1::4"}
    assert any(a["local"].startswith("fe80:") for a in eth0["addr_info"])
    assert ns_sysctl(ns6, "net.ipv6.conf.eth0.addr_gen_mode") == "0"  # eui64
    # and the port still forwards: a second endpoint is reachable through the bridge
    other = scratch.ip_netns()
    await kernel.attach(endpoint(bridge, scratch.name("tve"), 3, other))
    ping = run("ip", "netns", "exec", ns.rsplit("/", 1)[1], "ping", "-c1", "-W1", "172.18.0.3")
    assert ping.returncode == 0, ping.stdout + ping.stderr


async def test_internal_network_has_no_default_route(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    await kernel.attach(endpoint(bridge, scratch.name("tve"), 2, ns, gateway=None))
    assert ip_json("route", "show", "default", ns=ns) == []
    assert [r["dst"] for r in ip_json("route", "show", ns=ns)] == ["172.18.0.0/16"]


async def test_missing_namespace_is_not_found_and_leaves_nothing(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    host = scratch.name("tve")
    with pytest.raises(NotFound):
        await kernel.attach(endpoint(bridge, host, 2, "/run/netns/no-such-ns"))
    assert link(host) is None


async def test_taken_ifname_inside_conflicts_and_leaves_nothing(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    add_foreign("eth0", ns=ns)
    host = scratch.name("tve")
    before = ip_json("link", "show")
    with pytest.raises(Conflict, match="eth0 already exists in"):
        await kernel.attach(endpoint(bridge, host, 2, ns))
    assert ip_json("link", "show") == before
    assert {x["ifname"] for x in ip_json("link", "show", ns=ns)} == {"lo", "eth0", "eth0p"}
    assert link("eth0", ns=ns)["linkinfo"]["info_kind"] == "veth"


async def test_taken_host_ifname_conflicts_and_keeps_the_existing_link(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    host = scratch.name("tve")
    add_foreign(host)
    with pytest.raises(Conflict, match=f"host interface {host}"):
        await kernel.attach(endpoint(bridge, host, 2, ns))
    assert link(host)["linkinfo"]["info_kind"] == "veth" and "master" not in link(host)
    assert [x["ifname"] for x in ip_json("link", "show", ns=ns)] == ["lo"]


async def test_failure_inside_rolls_back_the_veth(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    host = scratch.name("tve")
    # a gateway outside the subnet: the route is refused after the veth exists
    spec = endpoint(bridge, host, 2, ns, gateway="10.99.0.1")
    with pytest.raises(KernelError, match=r"route via 10\.99\.0\.1"):
        await kernel.attach(spec)
    assert link(host) is None
    assert [x["ifname"] for x in ip_json("link", "show", ns=ns)] == ["lo"]


async def test_missing_bridge_is_not_found_and_leaves_nothing(kernel, scratch):
    ns = scratch.ip_netns()
    host = scratch.name("tve")
    with pytest.raises(NotFound, match="bridge"):
        await kernel.attach(endpoint("tnobridge", host, 2, ns))
    assert link(host) is None
    assert [x["ifname"] for x in ip_json("link", "show", ns=ns)] == ["lo"]


async def test_bridge_recreated_behind_our_back_is_found_again(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    subprocess.run(["ip", "link", "del", bridge], check=True)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    spec = endpoint(bridge, scratch.name("tve"), 2, scratch.ip_netns())
    await kernel.attach(spec)
    assert link(spec.host_ifname)["master"] == bridge


async def test_detach_twice(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    host = scratch.name("tve")
    await kernel.attach(endpoint(bridge, host, 2, ns))
    assert await kernel.detach(host) is True
    assert link(host) is None and link("eth0", ns=ns) is None
    assert await kernel.detach(host) is False


async def test_cancelled_attach_still_completes(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    spec = endpoint(bridge, scratch.name("tve"), 2, ns)
    with trio.CancelScope() as scope:
        scope.cancel()
        await kernel.attach(spec)
    assert_attached(ns, spec, bridge)


# --- observation -----------------------------------------------------------------------------


async def test_owned_links_lists_only_ours(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    spec = endpoint(bridge, scratch.name("tve"), 2, ns)
    await kernel.attach(spec)
    foreign = scratch.name("tdm")
    add_foreign(foreign)
    subprocess.run(["ip", "link", "set", foreign, "alias", "someone-else"], check=True)
    owned = {x.name: x for x in await kernel.owned_links()}
    assert set(owned) == {bridge, spec.host_ifname}
    assert owned[bridge].kind == "bridge" and owned[bridge].addresses == ("172.18.0.1/16",)
    veth = owned[spec.host_ifname]
    assert veth.kind == "veth" and veth.up and veth.alias == spec.alias
    assert veth.master == owned[bridge].index


async def test_host_routes_lists_non_default_main_routes(kernel, scratch):
    dummy = scratch.name("tdm")
    add_foreign(dummy)
    subprocess.run(["ip", "link", "set", dummy, "up"], check=True)
    subprocess.run(["ip", "addr", "add", "10.77.0.1/24", "dev", dummy], check=True)
    subprocess.run(["ip", "route", "add", "10.88.0.0/16", "via", "10.77.0.2"], check=True)
    subprocess.run(["ip", "route", "add", "default", "via", "10.77.0.2"], check=True)
    try:
        routes = {str(r) for r in await kernel.host_routes()}
    finally:
        run("ip", "route", "del", "default")
    expected = {
        r["dst"] for r in ip_json("-4", "route", "show", "table", "main") if r["dst"] != "default"
    }
    assert routes == expected
    assert routes == {"10.77.0.0/24", "10.88.0.0/16"}


async def test_set_ip_forward(kernel):
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("0\n")
    await kernel.set_ip_forward()
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == "1"


# --- measurement -----------------------------------------------------------------------------


async def test_measure_attach_existing_namespace(kernel, scratch):
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    host = scratch.name("tve")
    spec = endpoint(bridge, host, 2, ns)
    fds = len(os.listdir("/proc/self/fd"))
    samples = []
    for _ in range(100):
        start = time.perf_counter()
        await kernel.attach(spec)
        samples.append(time.perf_counter() - start)
        await kernel.detach(host)
    samples.sort()
    assert len(os.listdir("/proc/self/fd")) == fds  # no socket or namespace fd leaked
    print(
        f"\nattach existing netns x100: p50 {statistics.median(samples) * 1e3:.2f} ms, "
        f"p90 {samples[89] * 1e3:.2f} ms, min {samples[0] * 1e3:.2f} ms"
    )


async def test_an_mtu_below_ipv6s_minimum_attaches_ipv4_only(kernel, scratch):
    """Below 1280 bytes a link has no IPv6 at all: asking it for no IPv6 addresses fails
    (EAFNOSUPPORT), which is no reason to refuse the endpoint."""
    bridge = await make_bridge(kernel, scratch)
    ns = scratch.ip_netns()
    spec = endpoint(bridge, scratch.name("tve"), 2, ns, mtu=1200)
    await kernel.attach(spec)
    assert link("eth0", ns)["mtu"] == 1200
    assert_attached(ns, spec, bridge)
