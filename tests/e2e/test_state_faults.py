"""State safety under faults, with a real agentd: a full disk, the database deleted or damaged
while agentd runs, and lost or corrupt when it starts.

Each test ends with the invariant check: what agentd reports is what the kernel holds (its
bridges and veths with their marks, each endpoint's address in its namespace, one DNAT rule
per published port), no link was deleted or recreated (same ifindexes), and a restart reads
back the same state.
"""

from __future__ import annotations

import glob
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.harness import Host, ipv4_of, links, ns_exec, ping, sh, unique

pytestmark = pytest.mark.kernel

DB = "netagent.db"


def view(host: Host) -> tuple:
    """agentd's networks and endpoints, and the ifindexes of the links it owns."""
    nets = sorted(
        (n["id"], n["name"], n["bridge"], n["subnet"], n["gateway"], n.get("icc", True),
         tuple(sorted((n.get("labels") or {}).items())))
        for n in host.call("network.list", labels=[])
    )  # fmt: skip
    eps = sorted(
        (e["id"], e["network_id"], e["netns"], e["ifname"], e["host_ifname"], e["ip"], e["mac"],
         tuple(sorted(tuple(sorted(p.items())) for p in e.get("ports") or [])),
         e.get("sandbox"))
        for e in host.call("endpoint.list")
    )  # fmt: skip
    owned = sorted(
        (link["ifname"], link["ifindex"])
        for link in host.links()
        if (link.get("ifalias") or "").startswith("netagent:")
    )
    return nets, eps, owned


def consistent(host: Host) -> None:
    """What agentd reports is what the kernel holds, nothing more, nothing less."""
    nets = host.call("network.list", labels=[])
    eps = host.call("endpoint.list")
    kernel = {link["ifname"]: link for link in host.links()}
    marked = {
        n for n, link in kernel.items() if (link.get("ifalias") or "").startswith("netagent:")
    }
    assert marked == {n["bridge"] for n in nets} | {e["host_ifname"] for e in eps}
    for n in nets:
        assert kernel[n["bridge"]]["ifalias"].startswith(f"netagent:net:{n['id']}")
    rules = host.iptables_save()
    published = [(e, p) for e in eps for p in e.get("ports") or []]
    if host.backend == "nftables":  # one element of a dnat4 map per mapping
        dnat = [line for line in rules.splitlines() if line.startswith("dnat4")]
        wanted = [(f". {p['host_port']} :", f": {e['ip']} . {p['container_port']}")
                  for e, p in published]  # fmt: skip
    else:
        dnat = [line for line in rules.splitlines() if "-j DNAT" in line]
        wanted = [(f"--dport {p['host_port']}", f"--to-destination {e['ip']}:{p['container_port']}")
                  for e, p in published]  # fmt: skip
    assert len(dnat) == len(published), rules
    for port, target in wanted:
        assert any(port in d and target in d for d in dnat), (port, target, rules)
    for e in eps:
        assert kernel[e["host_ifname"]]["ifalias"].startswith(f"netagent:ep:{e['id']}")
        name = e["netns"].removeprefix("/run/netns/")
        prefix = next(n["subnet"] for n in nets if n["id"] == e["network_id"]).split("/")[1]
        assert ipv4_of(name, e["ifname"]) == [f"{e['ip']}/{prefix}"]


def _setup(host: Host) -> dict[str, str]:
    """A network with labels and ICC off, two sandboxes (one publishing a port), a namespace
    of the user's connected to two networks, and an empty network."""
    names = {k: unique(k) for k in ("c1-", "c2-", "x-", "y-")}
    host.ctl("network", "create", "--subnet", "10.61.0.0/24", "--label", "team=web",
             "-o", "icc=false", "web")  # fmt: skip
    host.ctl("network", "create", "--subnet", "10.62.0.0/24", "empty")
    host.ctl("run", "--network", "web", "-p", "8080:80", names["c1-"])
    host.ctl("run", names["c2-"])
    for k in ("x-", "y-"):
        sh("ip", "netns", "add", names[k])
    host.ctl("network", "connect", "web", names["x-"])
    host.ctl("network", "connect", "bridge", names["x-"])
    return names


def _cleanup(names: dict[str, str]) -> None:
    for k in ("x-", "y-", "c1-", "c2-", "c3-"):
        if k in names:
            sh("ip", "netns", "del", names[k], check=False)


def _fill(where: str) -> Path:
    """Fill the filesystem at `where` to its last byte."""
    filler = Path(where) / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_changes_nothing_and_reads_are_still_served() -> None:
    host = Host()
    names: dict[str, str] = {}
    try:
        os.makedirs(host.state_dir)
        sh("mount", "-t", "tmpfs", "-o", "size=1m", "netagent-state", host.state_dir)
        host.start()
        names = _setup(host)
        names["c3-"] = unique("c3-")
        before = view(host)
        filler = _fill(host.state_dir)
        c1, x, y = names["c1-"], names["x-"], names["y-"]
        attempts = [
            ("rm", c1),
            ("network", "disconnect", "web", x),
            ("network", "rm", "empty"),
            ("network", "create", "--subnet", "10.63.0.0/24", "new"),
            ("network", "connect", "web", y),
            ("port", "publish", "--network", "web", c1, "9090:90"),
            ("port", "unpublish", "--network", "web", c1, "8080:80"),
            ("run", "--network", "web", names["c3-"]),
        ]
        for args in attempts:
            r = host.ctl(*args, check=False)
            assert r.returncode == 8, (args, r.returncode, r.stderr)
            assert "full" in r.stderr, r.stderr
            assert view(host) == before, args  # nothing changed, no link recreated
            consistent(host)
        assert names["c3-"] not in sh("ip", "netns", "list").stdout
        assert host.call("system.info")["networks"] == 3  # reads still served
        assert ping(c1, "10.61.0.1")
        filler.unlink()
        host.ctl("rm", c1)  # with room again, it goes
        host.ctl("network", "connect", "web", y)
        consistent(host)
        after = view(host)
        host.stop()
        host.start()
        assert view(host) == after
        consistent(host)
    finally:
        host.close()
        sh("umount", "-l", host.state_dir, check=False)
        _cleanup(names)


def _kept(host: Host) -> list[str]:
    """The damaged databases kept aside (without their WAL files)."""
    found = glob.glob(f"{host.state_dir}/{DB}.corrupt-*")
    return [p for p in found if not p.endswith("-wal")]


def _rm_db(host: Host) -> None:
    for path in glob.glob(f"{host.state_dir}/{DB}*"):
        os.unlink(path)


def _garbage(host: Host) -> None:
    """Overwrite the database in place (same inode) with garbage."""
    with open(f"{host.state_dir}/{DB}", "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(b"\xa5" * max(size, 16384))


@pytest.mark.parametrize("fault", [_rm_db, _garbage], ids=["deleted", "garbage"])
def test_a_database_lost_while_running_loses_no_acknowledged_change(fault) -> None:
    host = Host()
    names: dict[str, str] = {}
    try:
        host.start()
        names = _setup(host)
        fault(host)
        host.ctl("network", "connect", "web", names["y-"])  # acknowledged after the fault
        host.ctl("port", "publish", "--network", "web", names["c1-"], "9090:90")
        before = view(host)
        consistent(host)
        assert host.stop(signal.SIGKILL) == -signal.SIGKILL  # no orderly close to help
        host.start()
        assert view(host) == before
        consistent(host)
        assert "store.recovered" in host.log()  # rewritten while running: no rebuild needed
        assert "store.rebuilt_from_kernel" not in host.log()
        assert len(_kept(host)) == (0 if fault is _rm_db else 1)
    finally:
        host.close()
        _cleanup(names)


def test_a_database_deleted_while_idle_is_rewritten_within_seconds() -> None:
    host = Host()
    names: dict[str, str] = {}
    try:
        host.start()
        names = _setup(host)
        before = view(host)
        _rm_db(host)
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{host.state_dir}/{DB}"):
            assert time.monotonic() < deadline, "database not rewritten"
            time.sleep(0.1)
        host.stop(signal.SIGKILL)
        host.start()
        assert view(host) == before
        consistent(host)
        assert "store.rebuilt_from_kernel" not in host.log()
    finally:
        host.close()
        _cleanup(names)


@pytest.mark.parametrize("fault", [_rm_db, _garbage], ids=["deleted", "garbage"])
def test_a_start_without_a_usable_store_rebuilds_it_from_the_kernel(fault) -> None:
    host = Host()
    names: dict[str, str] = {}
    try:
        host.start()
        names = _setup(host)
        host.ctl("port", "publish", "--network", "web", names["c1-"], "5353:53/udp")
        before = view(host)
        rules = host.iptables_save()
        host.stop()  # SIGTERM: links and rules stay
        fault(host)
        host.start()
        assert view(host) == before  # same records, and no link deleted or recreated
        assert host.iptables_save() == rules
        consistent(host)
        log = host.log()
        assert "store.rebuilt_from_kernel" in log and "adopt.complete" in log
        assert len(_kept(host)) == (fault is _garbage)
        c1, x = names["c1-"], names["x-"]
        web_ip = {e["netns"]: e["ip"] for e in host.call("endpoint.list", network="web")}
        assert ping(x, web_ip[f"/run/netns/{c1}"]) is False  # icc=false came back too
        assert ping(c1, "10.61.0.1")
        # and it is an ordinary store again: changes, a restart, a removal
        host.ctl("network", "connect", "web", names["y-"])
        after = view(host)
        host.stop(signal.SIGKILL)
        host.start()
        assert view(host) == after
        host.ctl("rm", c1)
        host.ctl("network", "disconnect", "web", x)
        consistent(host)
        assert ns_exec(x, "ip", "-j", "link").returncode == 0
    finally:
        host.close()
        _cleanup(names)


def test_marks_fit_and_name_their_records_in_the_kernel() -> None:
    host = Host()
    names: dict[str, str] = {}
    try:
        host.start()
        names = _setup(host)
        for link in links(host.name):
            alias = link.get("ifalias") or ""
            if alias.startswith("netagent:"):
                assert len(alias.encode()) <= 255 and alias.count(":") == 3, alias
    finally:
        host.close()
        _cleanup(names)
