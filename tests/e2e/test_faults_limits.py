"""Issue 17, limits and guards: a second instance, descriptor exhaustion, idle and abandoned
connections, deep JSON, refused peers, a missing firewall tool, a stopped kernel worker, agentd's
own namespace as a target, log floods. Each fault ends with the invariant check: nothing
half-applied, no leaked or lost link, address, rule or record (`_snapshot` before == after).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.core import errors
from agent.frontends.jsonrpc.client import Client, DaemonUnavailable, error_from_body
from agent.lockfile import EXIT_ALREADY_RUNNING
from tests.e2e.harness import VENV_BIN, Host, addrs, routes, running_host, sh, unique

pytestmark = pytest.mark.kernel

NOBODY = 65534


def _snapshot(host: Host) -> tuple:
    """Everything a fault could leave behind or take away, in the host namespace."""
    host.settle()
    return (
        host.iptables_save(),
        sorted((a["ifname"], *(x["local"] for x in a["addr_info"])) for a in addrs(host.name)),
        sorted(json.dumps(r, sort_keys=True) for r in routes(host.name)),
        sorted((n["id"], n["subnet"]) for n in host.call("network.list", labels=[])),
        sorted((e["id"], e["ip"]) for e in host.call("endpoint.list")),
    )


def _start(host: Host, *prefix: str, timeout: float = 20.0) -> None:
    """`host.start()`, with agentd run under `prefix` (e.g. prlimit)."""
    argv = [
        "nsenter", f"--net=/run/netns/{host.name}", *prefix, str(VENV_BIN / "agentd"),
        "--socket", host.socket, "--state-dir", host.state_dir, *host.extra_args,
    ]  # fmt: skip
    with open(host.log_path, "ab") as log:
        host.proc = subprocess.Popen(argv, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert host.proc.poll() is None, f"agentd exited:\n{host.log()}"
        with contextlib.suppress(Exception):
            Client(host.socket, timeout=2).call("system.info")
            return
        time.sleep(0.05)
    raise AssertionError(f"agentd not ready:\n{host.log()}")


def _agentd(host: Host, *args: str, path: str | None = None, timeout: float = 30):
    """Run a (second) agentd in the host namespace to completion."""
    env = dict(os.environ, PATH=path) if path is not None else None
    argv = ["nsenter", f"--net=/run/netns/{host.name}", str(VENV_BIN / "agentd"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def _log_events(host: Host, event: str) -> list[dict]:
    out = []
    for line in host.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
    return out


# -- defect 3: one instance per state dir and socket ------------------------------------------


def test_second_instance_refuses_and_leaves_the_first_serving() -> None:
    with running_host() as host:
        host.ctl("network", "create", "one")
        before = _snapshot(host)
        socket_inode = os.stat(host.socket).st_ino
        other_dir = str(host.dir / "other-state")
        other_sock = str(host.dir / "other.sock")
        for args in (
            ("--socket", host.socket, "--state-dir", host.state_dir),  # both the same
            ("--socket", other_sock, "--state-dir", host.state_dir),  # same state dir
            ("--socket", host.socket, "--state-dir", other_dir),  # same socket
        ):
            second = _agentd(host, *args)
            assert second.returncode == EXIT_ALREADY_RUNNING, second.stderr
            assert "Exceptions from Trio" not in second.stderr
            assert re.search(r"another (agentd|process) .*(state directory|serving)", second.stderr)
            # the first one's socket is untouched and it still answers
            assert os.stat(host.socket).st_ino == socket_inode
            assert host.call("system.info")["pid"] == host.proc.pid
        assert not os.path.exists(other_sock)
        assert _snapshot(host) == before


def test_socket_is_replaced_only_when_dead_and_removed_only_when_ours() -> None:
    host = Host()
    try:
        # a dead socket file (its owner is gone) is replaced
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(host.socket)
        dead.close()
        host.start()
        # someone else's socket now at the path: agentd's exit must not unlink it
        os.rename(host.socket, host.socket + ".agentd")
        squatter = socket.socket(socket.AF_UNIX)
        squatter.bind(host.socket)
        squatter.listen(1)
        assert host.stop() == 0
        assert os.path.exists(host.socket)
        squatter.close()
    finally:
        host.close()


# -- defect 5: connection limit, EMFILE, idle timeout ----------------------------------------


def _open_idle(path: str, n: int) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(path)
        conns.append(s)
    return conns


def _read_all(s: socket.socket, timeout: float) -> bytes | None:
    """Everything agentd sent until it closed the connection; None if it is still open."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except OSError:
        pass  # reset, or never connected (the backlog was full): closed all the same
    return data


def test_idle_connections_make_room_for_a_fresh_client() -> None:
    """nofile 64 (default limit: 32 connections); 100 idle connections held."""
    host = Host()
    try:
        _start(host, "prlimit", "--nofile=64:64", "--")
        before = _snapshot(host)
        held = _open_idle(host.socket, 100)
        time.sleep(0.5)
        started = time.monotonic()
        host.ctl("network", "create", "fresh")  # served at once despite the crowd
        assert time.monotonic() - started < 5
        answers = [_read_all(s, 0.1) for s in held]
        assert answers.count(None) <= 32  # the limit held: the others were closed
        closed = [a for a in answers if a is not None]
        assert closed.count(b"") > 0  # idle ones were closed to make room (EOF, no answer)
        assert all(a == b"" or b"too many connections" in a for a in closed)
        assert not _log_events(host, "api.accept.exhausted")  # never ran out of descriptors
        for s in held:
            s.close()
        host.ctl("network", "rm", "fresh")
        assert _snapshot(host) == before
    finally:
        host.close()


def test_connections_past_the_limit_are_refused_when_all_are_busy() -> None:
    """40 event subscribers (busy, never idle) against a limit of 32."""
    host = Host("--max-connections", "32")
    try:
        _start(host)
        before = _snapshot(host)
        streams = []
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.connect(host.socket)
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe","params":{}}\n')
            streams.append(s)
        answers = [s.makefile("rb").readline() for s in streams]
        subscribed = [a for a in answers if b'"result"' in a]
        refused = [json.loads(a) for a in answers if b'"error"' in a]
        # a subscriber that was still idle when the next one came may have been closed for it
        assert len(subscribed) == 32 and len(refused) + answers.count(b"") == 8
        assert refused, "no connection was refused: the test proves nothing"
        assert isinstance(error_from_body(refused[0]["error"]), errors.Busy)
        started = time.monotonic()
        r = host.ctl("network", "create", "fresh", check=False)
        assert r.returncode == 7 and "too many connections" in r.stderr
        assert time.monotonic() - started < 5  # told at once, not left hanging
        for s in streams:
            s.close()
        time.sleep(0.3)
        host.ctl("network", "create", "fresh")  # served once the subscribers are gone
        host.ctl("network", "rm", "fresh")
        assert _snapshot(host) == before
    finally:
        host.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_emfile_backs_off_and_idle_connections_are_closed() -> None:
    """nofile 64 with a connection limit above it: accept() fails with EMFILE; agentd backs
    off (a bounded number of log lines, no spin), idle connections are closed after
    --idle-timeout, and the waiting client is then served."""
    host = Host("--max-connections", "1000", "--idle-timeout", "2")
    try:
        _start(host, "prlimit", "--nofile=64:64", "--")
        before = _snapshot(host)
        held = _open_idle(host.socket, 120)
        time.sleep(0.3)
        cpu = _cpu_seconds(host.proc.pid)
        started = time.monotonic()
        host.ctl("network", "create", "late")  # waits for idle connections to be closed
        waited = time.monotonic() - started
        assert waited < 15
        spent = _cpu_seconds(host.proc.pid) - cpu
        assert spent < 0.2 * waited, (spent, waited)  # backed off, did not spin on accept()
        exhausted = _log_events(host, "api.accept.exhausted")
        assert exhausted, "accept() never ran out of descriptors: the test proves nothing"
        assert len(exhausted) <= 5 + waited + 1  # rate-limited (burst 5, 1/s)
        # the first connections (accepted) were closed for idleness: EOF, no answer
        assert [_read_all(s, 0.5) for s in held[:20]] == [b""] * 20
        for s in held:
            s.close()
        host.ctl("network", "rm", "late")
        assert _snapshot(host) == before
    finally:
        host.close()


def test_idle_connection_is_closed_and_the_client_reconnects() -> None:
    with running_host("--idle-timeout", "1") as host:
        client = host.client()
        assert client.call("system.info")
        time.sleep(2.5)  # agentd closes the idle connection; the next call reconnects
        assert client.call("system.info")
        assert _log_events(host, "api.connection.idle")


# -- defect 6: reserved subnets ----------------------------------------------------------------


def test_reserved_subnets_exit_5_and_change_nothing() -> None:
    with running_host() as host:
        before = _snapshot(host)
        for args in (
            ["--subnet", "127.0.0.0/8"],
            ["--subnet", "0.0.0.0/8"],
            ["--subnet", "224.0.0.0/4"],
            ["--subnet", "255.255.255.0/24"],
            ["--subnet", "169.254.0.0/16"],
            ["--subnet", "10.0.0.0/24", "--ip-range", "127.0.0.0/25"],
            ["--ipv6", "--subnet", "ff02::/64"],
            ["--ipv6", "--subnet", "fe80::/64"],
            ["--ipv6", "--subnet", "::/64"],
        ):
            r = host.ctl("network", "create", *args, "rsv", check=False)
            assert r.returncode == 5, (args, r.stderr)
            assert "is not usable for a network" in r.stderr, r.stderr
        run = _agentd(host, "--socket", str(host.dir / "p.sock"), "--state-dir",
                      str(host.dir / "p-state"), "--pool", "224.0.0.0/8:24")  # fmt: skip
        assert run.returncode != 0 and "pool 224.0.0.0/8 is not usable" in run.stderr
        assert _snapshot(host) == before


# -- defect 8: deep nesting --------------------------------------------------------------------


def test_deep_json_gets_an_error_and_the_connection_stays_usable() -> None:
    with running_host() as host:
        before = _snapshot(host)
        for depth in (1_000, 100_000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(host.socket)
            f = s.makefile("rwb")
            nested = b"[" * depth + b"]" * depth
            f.write(b'{"jsonrpc":"2.0","id":7,"method":"system.info","params":' + nested + b"}\n")
            f.write(b"[" * depth + b"\n")
            f.write(b'{"jsonrpc":"2.0","id":8,"method":"system.info"}\n')
            f.flush()
            first, second, third = (json.loads(f.readline()) for _ in range(3))
            assert first["error"]["code"] in (-32600, -32602), first
            assert "nested too deeply" in first["error"]["message"]
            assert second["error"]["code"] == -32600
            assert third["id"] == 8 and third["result"]["pid"] == host.proc.pid
            s.close()
        assert "Traceback" not in host.log()
        assert _snapshot(host) == before


# -- defect 9: a refused peer reads "permission denied" ---------------------------------------


def _call_as(uid: int, path: str, pause: float) -> tuple[str, str]:
    """Connect as `uid` (a forked child that drops root), wait `pause`, then call: the
    (class name, message) the client raised, or ("ok", "")."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            client = Client(path, timeout=5)
            try:
                client._connect()
                time.sleep(pause)  # agentd has refused us and closed by now
                client.call("system.info")
                out = ("ok", "")
            except errors.AgentError as exc:
                out = (type(exc).__name__, exc.message)
            os.write(write, json.dumps(out).encode())
        except BaseException as exc:
            os.write(write, json.dumps(("child failed", repr(exc))).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return tuple(json.loads(data))


def test_refused_peer_reads_permission_denied() -> None:
    with running_host() as host:
        before = _snapshot(host)
        os.chmod(host.dir, 0o755)
        os.chmod(host.socket, 0o666)  # the file lets everyone in: the peer check refuses
        for pause in (0.0, 0.3):
            kind, message = _call_as(NOBODY, host.socket, pause)
            assert kind == "PermissionDenied", (kind, message)
            assert "permission denied" in message
        # agentctl's exit status for it
        os.chmod(host.socket, 0o660)
        kind, message = _call_as(NOBODY, host.socket, 0.0)  # the file keeps us out
        assert kind == "PermissionDenied", (kind, message)
        assert _snapshot(host) == before


# -- defect 10: a missing or broken firewall tool ----------------------------------------------


def _path_without(tool_prefix: str, into: Path) -> str:
    """A PATH holding every program of the usual directories except `tool_prefix*`."""
    into.mkdir()
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not name.startswith(tool_prefix) and not (into / name).exists():
                (into / name).symlink_to(os.path.join(d, name))
    return str(into)


def test_missing_or_broken_iptables_is_named_with_its_package() -> None:
    host = Host()
    try:
        before_links = {a["ifname"] for a in addrs(host.name)}
        before_rules = host.iptables_save()
        path = _path_without("iptables", host.dir / "bin")
        run = _agentd(host, "--socket", host.socket, "--state-dir", host.state_dir, path=path)
        assert run.returncode == 1
        assert "iptables-restore was not found on PATH" in run.stderr
        assert "apt-get install iptables" in run.stderr
        assert "Exceptions from Trio" not in run.stderr
        # a broken one: present, but fails
        broken = host.dir / "bin" / "iptables-restore"
        broken.write_text(
            "#!/bin/sh\necho 'iptables-restore: libxtables.so.12 missing' >&2\nexit 1\n"
        )
        broken.chmod(0o755)
        run = _agentd(host, "--socket", host.socket, "--state-dir", host.state_dir, path=path)
        assert run.returncode == 1
        assert "is broken: iptables-restore: libxtables.so.12 missing" in run.stderr
        assert "apt-get install iptables" in run.stderr
        # nothing was created, and the socket is not left behind
        assert {a["ifname"] for a in addrs(host.name)} == before_links
        assert host.iptables_save() == before_rules
        assert not os.path.exists(host.socket)
    finally:
        host.close()


# -- defect 11: a per-request deadline ---------------------------------------------------------


def _worker_pid(agentd: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if (
                ppid == agentd
                and b"agent.kernel.worker" in Path(f"/proc/{entry}/cmdline").read_bytes()
            ):
                return int(entry)
    raise AssertionError("no kernel worker found")


def test_request_that_cannot_begin_in_time_is_busy_and_never_applied() -> None:
    with running_host("--request-timeout", "1") as host:
        ns = unique("dl-")
        sh("ip", "netns", "add", ns)
        try:
            before = _snapshot(host)
            worker = _worker_pid(host.proc.pid)
            os.kill(worker, signal.SIGSTOP)
            try:
                results = []
                for method, params in (
                    ("network.create", {"name": "late1"}),
                    ("endpoint.connect", {"network": "bridge", "netns": ns}),
                    ("network.create", {"name": "late2", "subnet": "10.77.0.0/24"}),
                ):
                    started = time.monotonic()
                    with pytest.raises(errors.Busy, match="could not begin within the 1 s"):
                        Client(host.socket, timeout=10).call(method, params)
                    results.append(time.monotonic() - started)
                assert max(results) < 5, results
                # reads are still served while the worker is stopped
                assert host.call("system.info")["pid"] == host.proc.pid
            finally:
                os.kill(worker, signal.SIGCONT)
            time.sleep(1.0)  # whatever was queued in the worker has run (or been refused)
            assert _snapshot(host) == before  # nothing was applied later
            assert [link["ifname"] for link in addrs(ns)] == ["lo"]  # no veth arrived late
            host.ctl("network", "create", "ontime")  # and the worker serves again
            host.ctl("network", "rm", "ontime")
            assert _snapshot(host) == before
        finally:
            sh("ip", "netns", "del", ns, check=False)


# -- defect 12: agentd's own namespace is never a target ---------------------------------------


def test_own_namespace_is_refused_as_a_connect_target() -> None:
    with running_host() as host:
        before = _snapshot(host)
        targets = [
            "/proc/self/ns/net",
            f"/proc/{host.proc.pid}/ns/net",
            f"/run/netns/{host.name}",  # the same namespace by another name
            host.name,
        ]
        for target in targets:
            with pytest.raises(errors.InvalidArgument, match="agentd's own"):
                host.call("endpoint.connect", network="bridge", netns=target)
            reserved = host.call("endpoint.reserve", network="bridge")
            with pytest.raises(errors.InvalidArgument, match="agentd's own"):
                host.call("endpoint.attach", endpoint=reserved["id"], netns=target)
            host.call("endpoint.remove", endpoint=reserved["id"])
        r = host.ctl("network", "connect", "bridge", "/proc/self/ns/net", check=False)
        assert r.returncode == 5 and "agentd's own" in r.stderr
        assert _snapshot(host) == before


# -- rate-limited logs -------------------------------------------------------------------------


def test_repeated_client_errors_do_not_flood_the_log() -> None:
    with running_host() as host:
        client = host.client()
        started = time.monotonic()
        for _ in range(300):
            with pytest.raises(errors.NotFound):
                client.call("network.inspect", {"network": "nope"})
        elapsed = time.monotonic() - started
        logged = _log_events(host, "request.failed")
        assert 1 <= len(logged) <= 5 + elapsed + 1
        assert any(r.get("suppressed") for r in logged) or len(logged) <= 5
        with contextlib.suppress(DaemonUnavailable):
            client.close()
