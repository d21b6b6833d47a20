"""agent.kernel.netns: named namespaces interoperate with `ip netns`; keys identify namespaces."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import trio

from agent.core.errors import Conflict, InvalidArgument, NotFound
from agent.kernel import netns, rtnl, rtsocket


def ip_netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("blue", "/run/netns/blue"),
        ("a.b-c_1", "/run/netns/a.b-c_1"),
        ("/proc/1/ns/net", "/proc/1/ns/net"),
    ],
)
def test_resolve(given, path):
    assert netns.resolve(given) == path


@pytest.mark.parametrize("bad", ["", "..", "a/b", "-x", "x" * 300])
def test_resolve_rejects_bad_names(bad):
    with pytest.raises(InvalidArgument):
        netns.resolve(bad)


def test_netns_key_errors():
    with pytest.raises(NotFound):
        netns.netns_key("/run/netns/does-not-exist")
    with pytest.raises(InvalidArgument):
        netns.netns_key("/etc/hostname")  # not nsfs
    with pytest.raises(InvalidArgument):
        netns.netns_key("/proc/self/ns/mnt")  # nsfs, but a mount namespace


def test_netns_key_is_st_dev_ino():
    st = os.stat("/proc/self/ns/net")
    assert netns.netns_key("/proc/self/ns/net") == f"{st.st_dev}:{st.st_ino}"


@pytest.mark.kernel
async def test_create_named_interoperates_with_ip_netns():
    path = await netns.create_named("tn-created")
    try:
        assert path == "/run/netns/tn-created"
        assert "tn-created" in ip_netns_list()
        out = subprocess.run(
            ["ip", "netns", "exec", "tn-created", "ip", "-o", "link"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert [line.split(":")[1].strip() for line in out.stdout.splitlines()] == ["lo"]
        key = netns.netns_key(path)
        assert key != netns.netns_key("/proc/self/ns/net")
        # the process `ip netns exec` runs sees the same namespace
        sleeper = subprocess.Popen(["ip", "netns", "exec", "tn-created", "sleep", "30"])
        try:
            for _ in range(200):
                try:
                    if netns.netns_key(f"/proc/{sleeper.pid}/ns/net") == key:
                        break
                except (NotFound, InvalidArgument):
                    pass
                await trio.sleep(0.005)
            assert netns.netns_key(f"/proc/{sleeper.pid}/ns/net") == key
        finally:
            sleeper.kill()
            sleeper.wait()
        with pytest.raises(Conflict):
            await netns.create_named("tn-created")
    finally:
        assert await netns.delete_named("tn-created") is True
    assert not os.path.exists(path)
    assert "tn-created" not in ip_netns_list()
    assert await netns.delete_named("tn-created") is False


@pytest.mark.kernel
async def test_delete_named_removes_a_namespace_made_by_ip():
    subprocess.run(["ip", "netns", "add", "tn-by-ip"], check=True)
    with pytest.raises(Conflict):
        await netns.create_named("tn-by-ip")
    assert await netns.delete_named("tn-by-ip") is True
    assert not os.path.exists("/run/netns/tn-by-ip")
    assert "tn-by-ip" not in ip_netns_list()


@pytest.mark.kernel
async def test_create_named_survives_cancellation():
    with trio.CancelScope() as scope:
        scope.cancel()
        await netns.create_named("tn-cancel")
    try:
        assert "tn-cancel" in ip_netns_list()
        netns.netns_key("/run/netns/tn-cancel")
    finally:
        await netns.delete_named("tn-cancel")


def _here() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.mark.kernel
async def test_socket_visiting_is_bound_to_the_namespace_and_the_thread_comes_home():
    path = await netns.create_named("tn-sock")
    subprocess.run(["ip", "link", "add", "tn-home", "type", "bridge"], check=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    before = _here()
    try:
        fd = netns.open_netns(path)
        try:
            sock = netns.socket_visiting(fd, home)
        finally:
            os.close(fd)
        assert _here() == before
        with sock:
            rt = rtsocket.RtSocket(sock)
            names = {
                rtsocket.Link(p).name for p in rtsocket.check(rt.transact([rtnl.dump_links()])[0])
            }
        assert names == {"lo"}
        # a fresh socket of this thread is the host's again
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as mine:
            rt = rtsocket.RtSocket(mine)
            names = {
                rtsocket.Link(p).name for p in rtsocket.check(rt.transact([rtnl.dump_links()])[0])
            }
        assert "tn-home" in names
    finally:
        os.close(home)
        subprocess.run(["ip", "link", "del", "tn-home"], check=True)
        await netns.delete_named("tn-sock")


@pytest.mark.kernel
def test_socket_visiting_a_file_that_is_no_namespace_fails_at_home(tmp_path):
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    before = _here()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="setns"):
            netns.socket_visiting(fd, home)
        assert _here() == before
    finally:
        os.close(fd)
        os.close(home)


@pytest.mark.kernel
async def test_socket_visiting_exits_the_process_if_it_cannot_come_back():
    """Home is a mount namespace fd: setns(CLONE_NEWNET) refuses it, so the way back fails."""
    path = await netns.create_named("tn-noway")
    script = (
        "import os, sys; from agent.kernel import netns; "
        f"fd = netns.open_netns({path!r}); home = os.open('/proc/self/ns/mnt', os.O_RDONLY); "
        "netns.socket_visiting(fd, home); print('went on')"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
    finally:
        await netns.delete_named("tn-noway")
    assert done.returncode == 70
    assert "went on" not in done.stdout
    assert "cannot return to its own network namespace" in done.stderr
