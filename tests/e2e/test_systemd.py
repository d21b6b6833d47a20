"""agentd under systemd: the unit files, socket activation, readiness, watchdog, hardening.

There is no systemd as PID 1 here, so each part is checked with systemd's own tools and the
protocols they speak: `systemd-analyze verify` and `security` read the shipped units;
`systemd-socket-activate` passes a listening socket exactly as a socket unit does
(LISTEN_FDS/LISTEN_PID); a datagram socket of the test is NOTIFY_SOCKET; `setpriv` runs agentd
with the unit's capability bounding set and no_new_privs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.frontends.jsonrpc.client import Client
from tests.e2e.harness import VENV_BIN, Host, ipv4_of, sh, unique

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
INSTALLED_AGENTD = "/opt/netagent/.venv/bin/agentd"
MAX_EXPOSURE = 4.0  # systemd-analyze security: "OK" and better


def _units_here(tmp_path: Path) -> Path:
    """The shipped units with ExecStart pointing at this checkout's agentd (verify checks that
    the executable exists; nothing else is changed)."""
    for unit in ("agentd.service", "agentd.socket"):
        text = (UNITS / unit).read_text().replace(INSTALLED_AGENTD, str(VENV_BIN / "agentd"))
        (tmp_path / unit).write_text(text)
    return tmp_path


def test_units_verify(tmp_path: Path) -> None:
    units = _units_here(tmp_path)
    r = sh(
        "systemd-analyze", "verify", str(units / "agentd.service"), str(units / "agentd.socket"),
        check=False,
    )  # fmt: skip
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def _unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_settings() -> None:
    service = _unit_settings("agentd.service")
    assert service["Type"] == ["notify"]
    assert float(service["WatchdogSec"][0]) > 0
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert set(service["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6",
    }  # fmt: skip
    socket_unit = _unit_settings("agentd.socket")
    listen = socket_unit["ListenStream"][0]
    assert socket_unit["Accept"] == ["no"]
    assert listen in service["ExecStart"][0]  # agentd is told the path systemd listens on


def test_security_exposure() -> None:
    r = sh("systemd-analyze", "security", "--offline=true", str(UNITS / "agentd.service"))
    m = re.search(r"Overall exposure level for agentd\.service: ([0-9.]+) (\w+)", r.stdout)
    assert m is not None, r.stdout[-2000:]
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


# -- running agentd the way systemd does -----------------------------------------------------


def _spawn(host: Host, prefix: list[str], env: dict[str, str] | None = None) -> None:
    argv = [
        "nsenter", f"--net=/run/netns/{host.name}", *prefix, str(VENV_BIN / "agentd"),
        "--socket", host.socket, "--state-dir", host.state_dir, *host.extra_args,
    ]  # fmt: skip
    with open(host.log_path, "ab") as log:
        host.proc = subprocess.Popen(
            argv, stdout=log, stderr=log, env={**os.environ, **(env or {})}
        )


def _wait_serving(host: Host, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert host.proc is not None and host.proc.poll() is None, host.log()
        with contextlib.suppress(Exception):
            Client(host.socket, timeout=5).call("system.info")
            return
        time.sleep(0.05)
    raise AssertionError(f"agentd not serving:\n{host.log()}")


def _wait_listening(host: Host, timeout: float = 10.0) -> socket.socket:
    """A connection to the socket systemd-socket-activate made (it binds, then listens: the
    file exists a moment before connections are accepted)."""
    deadline = time.monotonic() + timeout
    while True:
        assert host.proc.poll() is None, host.log()
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(host.socket)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            assert time.monotonic() < deadline, host.log()
            time.sleep(0.01)


@contextlib.contextmanager
def _host() -> Iterator[Host]:
    host = Host()
    try:
        yield host
    finally:
        host.close()


@pytest.mark.kernel
def test_socket_activation_serves_on_the_passed_socket() -> None:
    with _host() as host:
        _spawn(host, ["systemd-socket-activate", "-l", host.socket])
        _wait_listening(host).close()
        inode = os.stat(host.socket).st_ino
        # a client connecting while agentd is still starting is answered once it serves:
        # the connection waits in the socket's backlog (agentd never rebinds the socket)
        early = Client(host.socket, timeout=30)
        assert early.call("system.info")["socket"] == host.socket
        assert os.stat(host.socket).st_ino == inode
        assert '"activated":true' in host.log().replace(" ", "")
        pid = host.proc.pid  # its kernel worker does not take the socket for its own
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            assert b"LISTEN_FDS=" not in Path(f"/proc/{child}/environ").read_bytes()
        host.ctl("network", "create", "--subnet", "10.61.0.0/24", "act")
        assert host.stop() == 0
        # the socket file belongs to the socket unit: agentd leaves it in place
        assert os.stat(host.socket).st_ino == inode


@pytest.mark.kernel
def test_activation_without_a_listening_socket_is_refused(tmp_path: Path) -> None:
    with _host() as host:
        # --accept passes a connected socket per connection (Accept=yes): not agentd's model
        _spawn(host, ["systemd-socket-activate", "--accept", "-l", host.socket])
        with _wait_listening(host) as s:  # starts one agentd with the connection as fd 3
            s.settimeout(20)
            assert s.recv(100) == b""  # that agentd exits without serving
        deadline = time.monotonic() + 20
        while "no listening Unix stream socket" not in host.log():
            assert time.monotonic() < deadline, host.log()
            time.sleep(0.05)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def read_until(self, key: str, timeout: float = 20.0, value: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for _, msg in self.messages:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {key} in {self.messages}"
            self.sock.settimeout(remaining)
            with contextlib.suppress(TimeoutError):
                self.receive_one()

    def receive_one(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.splitlines() if line)
        self.messages.append((time.monotonic(), msg))
        return msg

    def drain(self, seconds: float) -> list[dict[str, str]]:
        """Every message received during the next `seconds`."""
        got: list[dict[str, str]] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            with contextlib.suppress(TimeoutError):
                got.append(self.receive_one())
        return got


@pytest.mark.kernel
def test_notify_ready_after_adoption_watchdog_and_status(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    with _host() as host:
        host.start()  # a first run makes a network and an endpoint to adopt
        c = unique("sd-")
        host.ctl("network", "create", "--subnet", "10.62.0.0/24", "kept")
        host.ctl("run", "--network", "kept", c)
        host.stop()
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
        _spawn(host, [], env)
        ready = notify.read_until("READY")
        # READY=1 comes after adoption: the adopted state is served at once
        assert ready["READY"] == "1" and ready["MAINPID"] == str(host.proc.pid)
        assert ready["STATUS"] == "serving: 2 networks, 1 endpoints"
        assert "agentd.ready" in host.log()
        names = {n["name"] for n in Client(host.socket, timeout=5).call("network.list", {})}
        assert "kept" in names
        assert ipv4_of(c, "eth0") == ["10.62.0.2/24"]
        earlier = [m for _, m in notify.messages[:-1]]
        assert any(m.get("STATUS", "").startswith("adopting") for m in earlier)
        assert not any("READY" in m for m in earlier)
        # WATCHDOG=1 every WATCHDOG_USEC/2 (0.2 s), from the running loop
        pings = [m for m in notify.drain(1.5) if m.get("WATCHDOG") == "1"]
        assert 3 <= len(pings) <= 10, pings
        # a stopped loop sends none; it resumes when the loop runs again
        host.proc.send_signal(signal.SIGSTOP)
        try:
            notify.drain(0.1)  # anything already queued
            assert not [m for m in notify.drain(1.0) if "WATCHDOG" in m]
        finally:
            host.proc.send_signal(signal.SIGCONT)
        assert [m for m in notify.drain(1.0) if "WATCHDOG" in m]
        # STATUS= follows the topology
        host.ctl("network", "create", "--subnet", "10.63.0.0/24", "more")
        notify.read_until("STATUS", value="serving: 3 networks, 1 endpoints", timeout=5)
        host.proc.send_signal(signal.SIGTERM)
        assert notify.read_until("STOPPING")["STOPPING"] == "1"
        assert host.proc.wait(20) == 0
        host.proc = None


@pytest.mark.kernel
def test_children_do_not_inherit_the_notify_variables(tmp_path: Path) -> None:
    """NOTIFY_SOCKET and WATCHDOG_* are agentd's: its kernel worker (and any tool it runs)
    must not take them for its own, as sd_notify(3)'s unset_environment says."""
    notify = NotifySocket(tmp_path / "notify")
    with _host() as host:
        _spawn(host, [], {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "10000000"})
        notify.read_until("READY")
        pid = host.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children  # the kernel worker
        for child in children:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            names = {item.split(b"=", 1)[0] for item in env}
            assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID"}
            assert b"PATH" in names  # the rest of the environment is there


# -- the unit's capabilities --------------------------------------------------------------


def _bounding_set() -> list[str]:
    caps = _unit_settings("agentd.service")["CapabilityBoundingSet"][0].split()
    return [c.removeprefix("CAP_").lower() for c in caps]


def _setpriv(caps: list[str]) -> list[str]:
    allowed = ",".join(f"+{c}" for c in caps)
    return [
        "setpriv", f"--bounding-set=-all,{allowed}", f"--inh-caps=-all,{allowed}",
        "--no-new-privs", "--",
    ]  # fmt: skip


@contextlib.contextmanager
def _held_namespace() -> Iterator[tuple[str, int]]:
    """A named namespace and the pid of a root process (all capabilities) inside it."""
    name = unique("held-")
    sh("ip", "netns", "add", name)
    holder = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not (pids := sh("ip", "netns", "pids", name).stdout.split()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield name, int(pids[0])
    finally:
        holder.kill()
        holder.wait()
        sh("ip", "netns", "del", name, check=False)


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv missing")
def test_agentd_works_with_the_units_capabilities() -> None:
    """Everything agentd does (bridges, veths into namespaces, IPv4 and IPv6 rules, published
    ports and their conntrack flush, namespaces it makes, a namespace given as
    /proc/PID/ns/net) within the bounding set."""
    with _host() as host, _held_namespace() as (held, pid):
        _spawn(host, _setpriv(_bounding_set()))
        _wait_serving(host)
        status = Path(f"/proc/{host.proc.pid}/status").read_text()
        bounding = int(re.search(r"CapBnd:\s+([0-9a-f]+)", status).group(1), 16)
        assert bin(bounding).count("1") == len(_bounding_set())
        assert re.search(r"NoNewPrivs:\s+1", status)
        host.ctl("network", "create", "--ipv6", "--subnet", "10.64.0.0/24", "caps")
        made = unique("ca-")
        host.ctl("run", "--network", "caps", "-p", "8080:80", made)  # agentd makes it
        host.ctl("network", "connect", "caps", f"/proc/{pid}/ns/net")
        assert ipv4_of(held, "eth0") == ["10.64.0.3/24"]
        assert host.publishes(8080)  # the DNAT, whichever the backend
        host.ctl("network", "disconnect", "caps", f"/proc/{pid}/ns/net")
        host.ctl("rm", made)
        host.ctl("network", "rm", "caps")
        assert host.stop() == 0


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv missing")
def test_each_capability_is_needed() -> None:
    """The check above is meaningful: without CAP_SYS_PTRACE a namespace given by a more
    privileged process's /proc path cannot be opened; without CAP_NET_ADMIN nothing starts."""
    with _host() as host, _held_namespace() as (_, pid):
        _spawn(host, _setpriv([c for c in _bounding_set() if c != "sys_ptrace"]))
        _wait_serving(host)
        r = host.ctl("network", "connect", "bridge", f"/proc/{pid}/ns/net", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        host.stop()
        _spawn(host, _setpriv([c for c in _bounding_set() if c != "net_admin"]))
        assert host.proc.wait(30) != 0
        host.proc = None


# -- the unit's read-only file system -------------------------------------------------------

# ProtectSystem=strict + ProtectKernelTunables=yes + ReadWritePaths=, as systemd builds them: in
# a mount namespace of its own every mount is remounted read-only except the API file systems
# (/proc, /sys, /dev), /proc/sys read-only too, then the writable paths bound read-write.
_READ_ONLY_FS = r"""
set -e
# (not the namespace files: nsfs mounts are not file systems agentd writes to)
for mp in $(awk '{for (i = 7; $i != "-"; i++); if ($(i+1) != "nsfs") print $5}' \
            /proc/self/mountinfo | sort -u); do
  case "$mp" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue;; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
for p in $RW_PATHS; do mount --rbind "$p" "$p" && mount -o remount,bind,rw "$p"; done
exec "$@"
"""


def _read_only_fs(rw_paths: list[str]) -> list[str]:
    script = _READ_ONLY_FS.replace("$RW_PATHS", " ".join(rw_paths))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]


def _spawn_read_only(host: Host, rw_paths: list[str]) -> None:
    argv = [
        "nsenter", f"--net=/run/netns/{host.name}", *_read_only_fs(rw_paths),
        str(VENV_BIN / "agentd"), "--socket", host.socket, "--state-dir", host.state_dir,
    ]  # fmt: skip
    with open(host.log_path, "ab") as log:
        host.proc = subprocess.Popen(argv, stdout=log, stderr=log)


def _writable_paths() -> list[str]:
    """The unit's writable paths, by what they are for (its RuntimeDirectory= and
    StateDirectory= are the test host's directory here)."""
    service = _unit_settings("agentd.service")
    assert service["ProtectSystem"] == ["strict"] and service["ProtectKernelTunables"] == ["yes"]
    assert set(service["RuntimeDirectory"][0].split()) == {"netagent", "netns"}
    return [*service["ReadWritePaths"][0].split(), "/run/netns"]


@pytest.mark.kernel
def test_agentd_works_on_the_units_read_only_file_system() -> None:
    with _host() as host, _held_namespace() as (held, _):
        rw = [*_writable_paths(), str(host.dir)]
        _spawn_read_only(host, rw)
        _wait_serving(host)
        with pytest.raises(OSError, match="Read-only"):  # the sandbox is real
            _in_agentd_mounts(host, "touch /var/tmp/netagent-probe /etc/netagent-probe")
        host.ctl("network", "create", "--ipv6", "--subnet", "10.66.0.0/24", "ro")
        made = unique("ro-")
        assert host.ctl("run", "--network", "ro", "-p", "8080:80", made).stdout.strip()
        host.ctl("network", "connect", "ro", held)
        assert ipv4_of(held, "eth0") == ["10.66.0.3/24"]
        host.ctl("network", "disconnect", "ro", held)
        host.ctl("rm", made)
        host.ctl("network", "rm", "ro")
        assert host.stop() == 0
        assert "Read-only" not in host.log()


@pytest.mark.kernel
def test_read_only_file_system_without_proc_sys_net_fails() -> None:
    """The check above is meaningful: without /proc/sys/net writable agentd cannot start."""
    with _host() as host:
        _spawn_read_only(host, ["/run/netns", str(host.dir)])
        assert host.proc.wait(30) != 0
        host.proc = None
        assert "Read-only" in host.log()


def _in_agentd_mounts(host: Host, command: str) -> None:
    r = sh("nsenter", f"--mount=/proc/{host.proc.pid}/ns/mnt", "sh", "-c", command, check=False)
    if r.returncode != 0:
        raise OSError(r.stderr)


# -- the unit's system call filter ----------------------------------------------------------


def _expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a `SystemCallFilter=` group or name, nested groups expanded."""
    seen = set() if seen is None else seen
    if not group.startswith("@"):
        return {group}
    if group in seen:
        return set()
    seen.add(group)
    out = sh("systemd-analyze", "syscall-filter", group).stdout.splitlines()[1:]
    calls: set[str] = set()
    for line in out:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= _expand(item, seen)
    return calls


def _filter_allows() -> set[str]:
    allowed: set[str] = set()
    for value in _unit_settings("agentd.service")["SystemCallFilter"]:
        deny = value.startswith("~")
        calls = set().union(*(_expand(g) for g in value.removeprefix("~").split()))
        allowed = allowed - calls if deny else allowed | calls
    return allowed


_TRACE: dict[str, str] = {}


@pytest.fixture
def trace(tmp_path: Path) -> str:
    """strace -f of agentd (its kernel worker and the tools it runs included) through start,
    create, run with ports (IPv4 and IPv6), connect, a repair, reconcile, disconnect, rm,
    network rm and stop: every call with its arguments, then the count of each (`-C`).
    Made once for the tests that read it."""
    if shutil.which("strace") is None:
        pytest.skip("strace missing")
    if "text" in _TRACE:
        return _TRACE["text"]
    out = tmp_path / "strace.txt"
    with _host() as host, _held_namespace() as (held, _):
        _spawn(host, ["strace", "-f", "-C", "-qq", "-s", "0", "-o", str(out)])
        tracer = host.proc.pid
        try:
            _trace_scenario(host, held)
        finally:  # agentd is strace's child: SIGTERM to it; strace exits with its status
            children = Path(f"/proc/{tracer}/task/{tracer}/children")
            for pid in children.read_text().split() if children.exists() else ():
                os.kill(int(pid), signal.SIGTERM)
        assert host.proc.wait(60) == 0
        host.proc = None
    _TRACE["text"] = out.read_text(errors="replace")
    return _TRACE["text"]


def _trace_scenario(host: Host, held: str) -> None:
    _wait_serving(host, timeout=60)
    host.ctl("network", "create", "--ipv6", "--subnet", "10.65.0.0/24", "sc")
    made = unique("sc-")
    host.ctl("run", "--network", "sc", "-p", "8080:80", made)
    host.ctl("network", "connect", "sc", held)
    bridge = host.call("network.inspect", network="sc")["network"]["bridge"]
    sh("ip", "-n", host.name, "link", "set", bridge, "down")
    host.ctl("reconcile")
    host.ctl("network", "disconnect", "sc", held)
    host.ctl("rm", made)
    host.ctl("network", "rm", "sc")


def _calls(trace: str, name: str) -> list[str]:
    """The argument lists of every traced `name(...)` call."""
    return re.findall(rf"^\d+ +{name}\((.*?)\) += ", trace, flags=re.M)


@pytest.mark.kernel
def test_system_call_filter_allows_every_call_agentd_makes(trace: str) -> None:
    summary = trace[trace.index("% time") :].splitlines()[2:]
    used = {line.split()[-1] for line in summary if line.strip() and line.split()[0][0].isdigit()}
    used.discard("total")
    assert {"setns", "mount", "sendmsg"} <= used  # the summary was read
    assert used - _filter_allows() == set()


@pytest.mark.kernel
def test_only_the_units_address_families_are_used(trace: str) -> None:
    allowed = set(_unit_settings("agentd.service")["RestrictAddressFamilies"][0].split())
    families = {args.split(",")[0] for args in _calls(trace, "socket")}
    assert {"AF_NETLINK", "AF_UNIX"} <= families
    assert families <= allowed


@pytest.mark.kernel
def test_only_network_namespaces_are_made_or_entered(trace: str) -> None:
    """RestrictNamespaces=net: unshare, clone and setns name no other namespace type
    (and setns always names one: systemd refuses setns(fd, 0) when types are restricted)."""
    kinds = set(_unit_settings("agentd.service")["RestrictNamespaces"][0].split())
    allowed = {f"CLONE_NEW{k.upper()}" for k in kinds}
    flags: list[str] = []
    flags += _calls(trace, "unshare")
    flags += [a.split(", ", 1)[1] for a in _calls(trace, "setns")]
    flags += re.findall(r"clone3?\(.*?flags=([A-Z_|]+)", trace)
    assert any("CLONE_NEWNET" in f for f in flags)  # the scenario made and entered some
    used = {x for f in flags for x in f.split("|") if x.startswith("CLONE_NEW")}
    assert used <= allowed
    assert not [a for a in _calls(trace, "setns") if a.endswith(", 0")]


@pytest.mark.kernel
def test_no_writable_executable_memory(trace: str) -> None:
    """MemoryDenyWriteExecute=yes: no mapping is made writable and executable, and no
    mapping is made executable after the fact (what systemd's filter refuses)."""
    if _unit_settings("agentd.service").get("MemoryDenyWriteExecute") != ["yes"]:
        pytest.skip("the unit allows it")
    wx = [a for a in _calls(trace, "mmap") if "PROT_WRITE" in a and "PROT_EXEC" in a]
    assert wx == []
    assert [a for a in _calls(trace, "mprotect") if "PROT_EXEC" in a] == []
    assert _calls(trace, "mmap")  # the trace has them


# -- agent.systemd's parsing, without a daemon ---------------------------------------------


@pytest.mark.parametrize(
    ("env", "fds"),
    [
        ({}, []),
        ({"LISTEN_FDS": "1"}, []),  # no LISTEN_PID: not for us
        ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, []),  # another process's
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"}, []),
    ],
)
def test_listen_fds_cases(env: dict[str, str], fds: list[int]) -> None:
    from agent.systemd import listen_fds

    given = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    given["LISTEN_FDNAMES"] = "x"
    assert listen_fds(given) == fds
    assert given == {}  # every variable removed, used or not


def test_listen_fds_passed_to_us() -> None:
    from agent.systemd import ActivationError, activated_socket, listen_fds

    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"}
    with pytest.raises(ActivationError, match="two"):
        listen_fds(env)
    # fd 3 is whatever the test process has there: a socket that is not a listening Unix
    # stream socket, or not a socket at all, is refused with a message naming the unit's fix
    placed = not _fd_open(3)
    if placed:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 3)
        os.close(null)
    elif _is_listening_unix(3):
        pytest.skip("fd 3 is a listening Unix socket in this process")
    try:
        with pytest.raises(ActivationError, match="ListenStream"):
            activated_socket({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})
        assert os.get_inheritable(3) is False
    finally:
        if placed:
            os.close(3)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _is_listening_unix(fd: int) -> bool:
    import stat

    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.family == socket.AF_UNIX and bool(
            s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
    finally:
        s.close()


def test_watchdog_usec_only_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.systemd import Notifier

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    n = Notifier()
    assert n.watchdog_usec == 0 and not n.enabled
    assert "WATCHDOG_USEC" not in os.environ and "WATCHDOG_PID" not in os.environ
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_usec == 30_000_000
    n.ready("x")  # without NOTIFY_SOCKET: nothing sent, nothing raised
