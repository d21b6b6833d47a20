"""The CNI plugin against the spec, through the real executables and a real agentd: every
command, every error code, idempotent DEL, GC, STATUS, CHECK after ADD and after the
interface or its address is gone, runtimeConfig (ports, ips, mac), create on first use."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import cni_harness as ch
from tests.e2e import traffic
from tests.e2e.harness import (
    Host,
    add_outside,
    ipv4_of,
    links,
    ping,
    running_host,
    sh,
    unique,
)

pytestmark = pytest.mark.kernel

CLIENTS = list(ch.CLIENTS.items())


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = unique("ctr")
    sh("ip", "netns", "add", name)
    try:
        yield f"/run/netns/{name}"
    finally:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with running_host() as h:
        h.call("network.create", name="cnet", subnet="10.71.0.0/24")
        yield h


def _endpoints(host: Host, network: str = "cnet") -> list[dict]:
    return host.call("endpoint.list", network=network)


@pytest.mark.parametrize(("client", "plugin"), CLIENTS)
def test_add_check_del(host: Host, client: str, plugin: str) -> None:
    conf = ch.conf(host.socket, "cnet")
    with namespace() as ns:
        ids = {"container": f"c-{client}", "netns": ns, "ifname": "net1"}
        rc, res = ch.call(plugin, "ADD", conf, **ids)
        assert rc == 0, res
        (ep,) = _endpoints(host)
        assert ep["attachment"] == f"c-{client}/net1"
        name = ns.rsplit("/", 1)[1]
        assert res == {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": ep["host_ifname"]},
                {"name": "net1", "mac": ep["mac"], "sandbox": ns},
            ],
            "ips": [{"address": f"{ep['ip']}/24", "gateway": "10.71.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.71.0.1"}],
            "dns": {"nameservers": ["10.71.0.1"]},  # the network answers names
        }
        assert ipv4_of(name, "net1") == [f"{ep['ip']}/24"]
        assert ping(name, "10.71.0.1")
        assert ch.call(plugin, "CHECK", dict(conf, prevResult=res), **ids) == (0, None)
        assert ch.call(plugin, "DEL", dict(conf, prevResult=res), **ids) == (0, None)
        host.settle()
        assert _endpoints(host) == [] and ipv4_of(name, "net1") == []
        assert os.path.exists(ns)  # a namespace agentd did not make stays
        # DEL again, without prevResult, without a namespace: nothing left, success
        assert ch.call(plugin, "DEL", conf, **ids) == (0, None)
        assert ch.call(plugin, "DEL", conf, container=ids["container"], ifname="net1") == (0, None)
        # the address went back: the next ADD may have it again
        rc, again = ch.call(plugin, "ADD", dict(conf, runtimeConfig={"ips": [ep["ip"]]}), **ids)
        assert rc == 0 and again["ips"][0]["address"] == f"{ep['ip']}/24"
        assert ch.call(plugin, "DEL", conf, **ids) == (0, None)


def test_del_after_the_namespace_is_gone_releases_the_address(host: Host) -> None:
    conf = ch.conf(host.socket, "cnet")
    with namespace() as ns:
        ids = {"container": "gone1", "netns": ns, "ifname": "eth0"}
        assert ch.call(ch.NATIVE, "ADD", conf, **ids)[0] == 0
    # the namespace was deleted (by the runtime, before DEL): agentd releases it, DEL is a no-op
    assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
    host.settle()
    assert _endpoints(host) == []


def test_del_of_another_network_leaves_the_attachment(host: Host) -> None:
    host.call("network.create", name="cnet2", subnet="10.76.0.0/24")
    conf, other = ch.conf(host.socket, "cnet"), ch.conf(host.socket, "cnet2")
    with namespace() as ns:
        ids = {"container": "two", "netns": ns, "ifname": "eth0"}
        assert ch.call(ch.NATIVE, "ADD", conf, **ids)[0] == 0
        assert ch.call(ch.NATIVE, "DEL", other, **ids) == (0, None)  # not this network's
        assert [e["attachment"] for e in _endpoints(host)] == ["two/eth0"]
        assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
        host.settle()
        assert _endpoints(host) == []
    host.call("network.remove", network="cnet2")


def test_check_fails_once_the_interface_or_its_address_is_gone(host: Host) -> None:
    conf = ch.conf(host.socket, "cnet")
    with namespace() as ns:
        name = ns.rsplit("/", 1)[1]
        ids = {"container": "chk1", "netns": ns, "ifname": "eth0"}
        rc, res = ch.call(ch.NATIVE, "ADD", conf, **ids)
        checked = dict(conf, prevResult=res)
        assert ch.call(ch.NATIVE, "CHECK", checked, **ids) == (0, None)
        address = res["ips"][0]["address"]
        sh("ip", "-n", name, "addr", "del", address, "dev", "eth0")
        rc, err = ch.call(ch.NATIVE, "CHECK", checked, **ids)
        assert rc != 0 and err["code"] == 104 and address in err["msg"]
        # a prevResult that is not this attachment's
        other = json.loads(json.dumps(res))
        other["ips"][0]["address"] = "10.71.0.250/24"
        sh("ip", "-n", name, "addr", "add", address, "dev", "eth0")
        assert ch.call(ch.NATIVE, "CHECK", checked, **ids) == (0, None)
        rc, err = ch.call(ch.NATIVE, "CHECK", dict(conf, prevResult=other), **ids)
        assert rc != 0 and err["code"] == 104
        sh("ip", "-n", name, "link", "del", "eth0")
        rc, err = ch.call(ch.NATIVE, "CHECK", checked, **ids)
        assert rc != 0 and err["code"] == 104
        assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
        host.settle()
        assert _endpoints(host) == []


def test_gc_releases_every_attachment_not_listed(host: Host) -> None:
    conf = ch.conf(host.socket, "cnet", version="1.1.0")
    with namespace() as a, namespace() as b, namespace() as c, namespace() as d:
        for ctr, ns in (("gca", a), ("gcb", b), ("gcc", c)):
            assert ch.call(ch.NATIVE, "ADD", conf, container=ctr, netns=ns, ifname="eth0")[0] == 0
        # an endpoint that is not a CNI attachment is never GC's business
        other = host.call("endpoint.connect", network="cnet", netns=d)
        valid = [{"containerID": "gcb", "ifname": "eth0"}]
        gc_conf = dict(conf, **{"cni.dev/valid-attachments": valid})
        assert ch.call(ch.NATIVE, "GC", gc_conf) == (0, None)
        host.settle()
        left = {e["attachment"] or e["id"] for e in _endpoints(host)}
        assert left == {"gcb/eth0", other["id"]}
        assert ch.call(ch.NATIVE, "GC", gc_conf) == (0, None)  # again: nothing to do
        rc, err = ch.call(ch.NATIVE, "GC", conf)  # without the list: refused, nothing released
        assert (rc, err["code"]) == (1, 7)
        host.call("endpoint.remove", endpoint=other["id"])
        assert ch.call(ch.NATIVE, "DEL", conf, container="gcb", ifname="eth0") == (0, None)
        host.settle()
        assert _endpoints(host) == []


def test_status(host: Host) -> None:
    conf = ch.conf(host.socket, "cnet", version="1.1.0")
    for plugin in ch.CLIENTS.values():
        assert ch.call(plugin, "STATUS", conf) == (0, None)
        rc, err = ch.call(plugin, "STATUS", dict(conf, network="nosuch"))
        assert (rc, err["code"]) == (1, 50)
        rc, err = ch.call(plugin, "STATUS", dict(conf, socket=host.socket + ".none"))
        assert (rc, err["code"]) == (1, 50) and "not reachable" in err["msg"]


ERRORS = [
    # (why, command, conf changes, env, code)
    ("unknown version", "ADD", {"cniVersion": "0.2.0"}, {}, 1),
    ("CHECK before 0.4.0", "CHECK", {"cniVersion": "0.3.1"}, {}, 1),
    ("GC before 1.1.0", "GC", {"cni.dev/valid-attachments": []}, {}, 1),
    ("STATUS before 1.1.0", "STATUS", {}, {}, 1),
    ("no CNI_NETNS", "ADD", {}, {"netns": ""}, 4),
    ("no CNI_IFNAME", "ADD", {}, {"ifname": ""}, 4),
    ("bad CNI_IFNAME", "ADD", {}, {"ifname": "x" * 16}, 4),
    ("bad CNI_CONTAINERID", "ADD", {}, {"container": "../x"}, 4),
    ("relative CNI_NETNS", "ADD", {}, {"netns": "ctr"}, 4),
    ("unknown command", "FROB", {}, {}, 4),
    ("unknown network", "ADD", {"network": "nosuch"}, {}, 7),
    ("bad field type", "ADD", {"mtu": "big"}, {}, 7),
    ("bad static ip", "ADD", {"runtimeConfig": {"ips": ["10.71.0.300"]}}, {}, 7),
    ("static ip outside", "ADD", {"runtimeConfig": {"ips": ["10.9.0.5/24"]}}, {}, 7),
    ("bad port", "ADD", {"runtimeConfig": {"portMappings": [{"hostPort": 0,
                                                            "containerPort": 80}]}}, {}, 7),
    ("bad mac", "ADD", {"runtimeConfig": {"mac": "zz"}}, {}, 7),
    ("CHECK without prevResult", "CHECK", {}, {}, 7),
    ("unreachable agentd", "ADD", {"socket": "/nonexistent/agent.sock"}, {}, 11),
]  # fmt: skip


@pytest.mark.parametrize(("why", "command", "changes", "env", "code"), ERRORS,
                         ids=[e[0] for e in ERRORS])  # fmt: skip
def test_errors_change_nothing(
    host: Host, why: str, command: str, changes: dict, env: dict, code: int
) -> None:
    conf = {**ch.conf(host.socket, "cnet"), **changes}
    with namespace() as ns:
        ids = {"container": "err1", "netns": ns, "ifname": "eth0", **env}
        before = host.iptables_save()
        for plugin in ch.CLIENTS.values():
            rc, err = ch.call(plugin, command, conf, **ids)
            assert rc == 1, (why, err)
            assert err["code"] == code and err["msg"], (why, err)
            assert err["cniVersion"] == conf["cniVersion"]
        assert _endpoints(host) == []
        assert host.iptables_save() == before
        assert [link["ifname"] for link in links(ns.rsplit("/", 1)[1])] == ["lo"]


def test_decoding_failure_and_the_default_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A configuration that is not JSON names no socket: the clients use the default one,
    where agentd answers 6. (A tmpfs over /run/netagent, in this private mount namespace.)"""
    sh("mkdir", "-p", "/run/netagent")
    sh("mount", "-t", "tmpfs", "cni-test", "/run/netagent")
    try:
        with running_host() as h:
            h.stop()
            h.socket = "/run/netagent/agent.sock"
            h.start()
            for plugin in ch.CLIENTS.values():
                for stdin in (b"{not json", b"[1, 2]", b""):
                    rc, err = ch.call(plugin, "ADD", stdin, container="x", netns="/x", ifname="e")
                    assert (rc, err["code"], err["cniVersion"]) == (1, 6, "1.1.0")
    finally:
        sh("umount", "/run/netagent")


def test_runtime_config_ports_ips_mac(host: Host) -> None:
    caps = {"portMappings": [{"hostPort": 8471, "containerPort": 80, "protocol": "tcp",
                              "hostIP": ""}],
            "ips": ["10.71.0.77/24"], "mac": "02:00:00:00:71:77"}  # fmt: skip
    conf = ch.conf(host.socket, "cnet", runtimeConfig=caps)
    outside, host_ip, outside_ip = add_outside(host)
    try:
        with namespace() as ns:
            name = ns.rsplit("/", 1)[1]
            ids = {"container": "rc1", "netns": ns, "ifname": "eth0"}
            rc, res = ch.call(ch.NATIVE, "ADD", conf, **ids)
            assert rc == 0, res
            assert res["ips"][0]["address"] == "10.71.0.77/24"
            assert res["interfaces"][1]["mac"] == "02:00:00:00:71:77"
            (ep,) = _endpoints(host)
            assert ep["ports"] == [
                {"protocol": "tcp", "host_port": 8471, "container_port": 80, "host_ip": ""}
            ]
            with traffic.serve(name, tcp=[80]):
                assert traffic.tcp(outside, host_ip, 8471) == outside_ip
            # another attachment may not take the same address or host port
            with namespace() as ns2:
                ids2 = {"container": "rc2", "netns": ns2, "ifname": "eth0"}
                rc, err = ch.call(ch.NATIVE, "ADD", conf, **ids2)
                assert (rc, err["code"]) == (1, 100)
            assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
            host.settle()
            assert "8471" not in host.iptables_save()
    finally:
        sh("ip", "netns", "del", outside, check=False)


def test_subnet_creates_the_network_once_under_concurrent_adds(host: Host) -> None:
    """A Kubernetes node's conflist carries its pod CIDR: the first ADDs create the network,
    concurrently and idempotently."""
    conf = ch.conf(host.socket, "podnet", subnet="10.72.0.0/24", mtu=1400)
    with contextlib.ExitStack() as stack:
        spaces = [stack.enter_context(namespace()) for _ in range(6)]
        results: list[tuple[int, dict]] = []

        def one(i: int, ns: str) -> None:
            results.append(ch.call(ch.NATIVE, "ADD", conf, container=f"pod{i}", netns=ns,
                                   ifname="eth0"))  # fmt: skip

        threads = [threading.Thread(target=one, args=(i, ns)) for i, ns in enumerate(spaces)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [rc for rc, _ in results] == [0] * 6, results
        nets = [n for n in host.call("network.list") if n["name"] == "podnet"]
        assert len(nets) == 1 and nets[0]["subnet"] == "10.72.0.0/24" and nets[0]["mtu"] == 1400
        addresses = sorted(res["ips"][0]["address"] for _, res in results)
        assert len(set(addresses)) == 6
        rc, err = ch.call(ch.NATIVE, "ADD", dict(conf, subnet="10.73.0.0/24"), container="pod9",
                          netns=spaces[0], ifname="eth1")  # fmt: skip
        assert (rc, err["code"]) == (1, 7)  # the network exists with another subnet
        for i in range(6):
            assert ch.call(ch.NATIVE, "DEL", conf, container=f"pod{i}", ifname="eth0")[0] == 0
    host.settle()
    host.call("network.remove", network="podnet")


def test_legacy_versions_tag_address_families(host: Host) -> None:
    for version in ("0.3.0", "0.3.1", "0.4.0"):
        conf = ch.conf(host.socket, "cnet", version=version)
        with namespace() as ns:
            ids = {"container": "old1", "netns": ns, "ifname": "eth0"}
            rc, res = ch.call(ch.NATIVE, "ADD", conf, **ids)
            assert rc == 0 and res["cniVersion"] == version
            assert res["ips"][0]["version"] == "4" and res["ips"][0]["interface"] == 1
            assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)


def test_both_clients_print_the_same_bytes(host: Host) -> None:
    """The C client and its Python twin on the same inputs: same output, same status."""
    base = ch.conf(host.socket, "cnet")
    with namespace() as ns:
        ids = {"container": "twin", "netns": ns, "ifname": "eth0"}
        fixed = dict(base, runtimeConfig={"ips": ["10.71.0.99"], "mac": "02:00:00:00:71:99"})
        cases = [
            ("VERSION", {"cniVersion": "0.4.0"}, {}),
            ("VERSION", b"", {}),
            ("STATUS", dict(base, cniVersion="1.1.0", socket="/nonexistent.sock"), {}),
            ("ADD", dict(base, socket="/nonexistent.sock"), ids),
            ("ADD", dict(base, network="nosuch"), ids),
            ("ADD", dict(base, cniVersion="9.9.9"), ids),
            ("ADD", fixed, ids),
            ("DEL", fixed, ids),
            ("DEL", fixed, ids),
        ]
        for command, stdin, env in cases:
            outs = []
            for plugin in ch.CLIENTS.values():
                rc, out = ch.run(plugin, command, stdin, **env)
                if command == "ADD" and rc == 0:  # the host veth's name is drawn per endpoint
                    doc = json.loads(out)
                    doc["interfaces"][0]["name"] = "HOST"
                    out = json.dumps(doc).encode()
                    assert ch.run(plugin, "DEL", fixed, **ids)[0] == 0
                    host.settle()
                outs.append((rc, out))
            assert outs[0] == outs[1], (command, stdin, outs)


def test_agentctl_cni_install(host: Host, tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("cni")
    r = host.ctl("cni", "install", "--bin-dir", str(d / "bin"), "--conf-dir", str(d / "net.d"),
                 "--network", "cnet")  # fmt: skip
    plugin = d / "bin" / "netagent"
    assert plugin.read_bytes() == Path(ch.NATIVE).read_bytes()
    assert json.loads((d / "net.d" / "netagent-cnet.conflist").read_text()) == {
        "cniVersion": "1.0.0",
        "name": "cnet",
        "plugins": [{"type": "netagent", "network": "cnet", "socket": host.socket,
                     "capabilities": {"portMappings": True, "ips": True, "mac": True}}],
    }  # fmt: skip
    assert str(plugin) in r.stdout
    r = host.ctl("cni", "install", "--bin-dir", str(d / "b2"), "--conf-dir", str(d / "c2"),
                 "--network", "nosuch", check=False)  # fmt: skip
    assert r.returncode != 0 and "nosuch" in r.stderr
    assert not (d / "c2").exists()


def test_dual_stack_network_made_on_first_use(host: Host) -> None:
    """A node's conflist with both families: the result has an address, gateway and default
    route of each, CHECK reads both inside the namespace."""
    conf = ch.conf(host.socket, "dual6", subnet="10.79.0.0/24", ipv6=True,
                   subnet6="fd00:79::/64")  # fmt: skip
    with namespace() as ns:
        ids = {"container": "v6", "netns": ns, "ifname": "eth0"}
        rc, res = ch.call(ch.NATIVE, "ADD", conf, **ids)
        assert rc == 0, res
        assert [(ip["address"], ip["gateway"]) for ip in res["ips"]] == [
            ("10.79.0.2/24", "10.79.0.1"), ("fd00:79::2/64", "fd00:79::1")]  # fmt: skip
        assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.79.0.1"},
                                 {"dst": "::/0", "gw": "fd00:79::1"}]  # fmt: skip
        assert ch.call(ch.NATIVE, "CHECK", dict(conf, prevResult=res), **ids) == (0, None)
        name = ns.rsplit("/", 1)[1]
        assert ping(name, "fd00:79::1")
        sh("ip", "-n", name, "addr", "del", "fd00:79::2/64", "dev", "eth0")
        rc, err = ch.call(ch.NATIVE, "CHECK", dict(conf, prevResult=res), **ids)
        assert (rc, err["code"]) == (1, 104) and "fd00:79::2/64" in err["msg"]
        assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
    host.settle()
    host.call("network.remove", network="dual6")


def test_a_process_namespace_by_proc_path_is_never_deleted_and_released_when_gone(
    host: Host,
) -> None:
    """CNI_NETNS=/proc/PID/ns/net (a namespace agentd did not make): ADD works, DEL leaves the
    namespace alone; when the process (and its namespace) goes, the attachment is released."""
    conf = ch.conf(host.socket, "cnet")
    proc = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        deadline = time.monotonic() + 10
        while os.readlink(path) == os.readlink("/proc/self/ns/net"):  # unshare not done yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ids = {"container": "proc1", "netns": path, "ifname": "eth0"}
        rc, res = ch.call(ch.NATIVE, "ADD", conf, **ids)
        assert rc == 0 and res["interfaces"][1]["sandbox"] == path
        inside = sh("nsenter", f"--net={path}", "ip", "-j", "addr", "show", "dev", "eth0").stdout
        assert res["ips"][0]["address"].split("/")[0] in inside
        assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
        assert proc.poll() is None and os.path.exists(path)  # the namespace lives on
        assert ch.call(ch.NATIVE, "ADD", conf, **ids)[0] == 0
    finally:
        proc.kill()
        proc.wait()
    # the namespace went with its process: its veth too, and agentd released the endpoint
    deadline = time.monotonic() + 10
    while _endpoints(host):
        assert time.monotonic() < deadline, _endpoints(host)
        time.sleep(0.02)
    assert ch.call(ch.NATIVE, "DEL", conf, **ids) == (0, None)
