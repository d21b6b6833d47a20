"""One agentd per state dir (`agent.lockfile`), the socket claim (`limits.claim_socket`,
`release_socket`) and the start-up tool check (`agent.preflight`), with real processes, locks,
sockets and a real PATH."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import lockfile, preflight
from agent.frontends.jsonrpc.limits import (
    SocketInUse,
    claim_socket,
    release_socket,
    socket_identity,
)

HOLD = """
import sys, time
from agent.lockfile import hold_state_dir
with hold_state_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(state: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    first = _holder(tmp_path / "state")
    try:
        with (
            pytest.raises(lockfile.AlreadyRunning, match=f"pid {first.pid}") as info,
            lockfile.hold_state_dir(str(tmp_path / "state")),
        ):
            pass
        assert info.value.holder == first.pid
    finally:
        first.kill()
        first.wait()


def test_lock_is_released_by_the_kernel_when_the_holder_is_killed(tmp_path: Path) -> None:
    first = _holder(tmp_path / "state")
    first.send_signal(signal.SIGKILL)
    first.wait()
    with lockfile.hold_state_dir(str(tmp_path / "state")) as path:
        assert Path(path).read_text().strip() == str(os.getpid())
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_claim_socket_replaces_a_dead_one_and_refuses_a_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays; nobody listens
    ours = claim_socket(path)
    identity = ours.identity
    assert identity is not None and os.stat(path).st_mode & 0o777 == 0o660
    try:
        with pytest.raises(SocketInUse, match="another process is serving"):
            claim_socket(path)
        assert socket_identity(path) == identity  # the live one was not touched
    finally:
        ours.sock.close()
    # someone else's socket now at the path: not ours to remove
    os.unlink(path)
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(path)
    try:
        assert not release_socket(path, identity)
        assert os.path.exists(path)
        assert release_socket(path, socket_identity(path))
        assert not os.path.exists(path)
    finally:
        theirs.close()


def test_claim_socket_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("precious")
    with pytest.raises(SocketInUse, match="not a socket"):
        claim_socket(str(path))
    assert path.read_text() == "precious"


def test_preflight_names_the_missing_or_broken_tool_and_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(preflight.MissingTool, match="iptables-restore was not found") as info:
        preflight.check_tools("iptables")
    assert "apt-get install iptables" in str(info.value)
    for tool, body in (("iptables-restore", "exit 0"), ("iptables-save", "echo oops >&2; exit 3")):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / tool).chmod(0o755)
    with pytest.raises(preflight.MissingTool, match=r"iptables-save .* is broken: oops"):
        preflight.check_tools("iptables")
    (tmp_path / "iptables-save").write_text("#!/bin/sh\nexit 0\n")
    started = time.monotonic()
    preflight.check_tools("iptables")
    assert time.monotonic() - started < preflight.VERSION_TIMEOUT
    preflight.check_tools("no-such-backend")  # nothing known to check
