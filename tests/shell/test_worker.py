"""The kernel worker process: errors cross it whole, and its death is an error, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import trio

from agent.core.attach import Bridge
from agent.core.errors import Conflict, KernelError
from agent.kernel.client import open_kernel

pytestmark = pytest.mark.kernel


def _children() -> set[int]:
    """Children of this thread (the Trio thread: it is the one that spawns the worker)."""
    tid = pid = os.getpid()
    with open(f"/proc/{pid}/task/{tid}/children") as f:
        return {int(x) for x in f.read().split()}


async def test_an_error_keeps_its_kind_message_and_data():
    name = "twk-veth0"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "twk-veth1"], check=True)
    try:
        async with open_kernel() as kernel:
            with pytest.raises(Conflict) as caught:
                await kernel.ensure_bridge(Bridge(name, "x", "172.30.0.1/16"))
        assert "not a bridge" in caught.value.message
        assert caught.value.data == {"bridge": name}
    finally:
        subprocess.run(["ip", "link", "del", name], check=True)


async def test_the_worker_is_a_child_of_the_trio_thread_and_stops_with_the_block():
    before = _children()
    async with open_kernel():
        (worker,) = _children() - before
        with open(f"/proc/{worker}/cmdline", "rb") as f:
            assert b"agent.kernel.worker" in f.read()
    assert worker not in _children()  # exited and reaped


async def test_a_dead_worker_fails_the_calls_and_ends_the_block():
    before = _children()
    with pytest.raises(BaseException) as caught:  # which one: checked below
        async with open_kernel() as kernel:
            (worker,) = _children() - before
            os.kill(worker, signal.SIGKILL)
            with trio.fail_after(5), pytest.raises(KernelError, match="worker"):
                await kernel.host_routes()
            await trio.sleep_forever()  # the block is ended for us
    errors = (
        caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    )
    assert any(isinstance(e, KernelError) and "exited (status -9)" in e.message for e in errors), (
        errors
    )


async def test_the_worker_does_not_import_from_the_current_directory(tmp_path, monkeypatch):
    """An `agent` package in agentd's working directory is not what the worker runs (-P)."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "__init__.py").write_text("raise SystemExit('imported from cwd')\n")
    monkeypatch.chdir(tmp_path)
    async with open_kernel() as kernel:
        assert isinstance(await kernel.host_routes(), list)
