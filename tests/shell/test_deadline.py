"""The request deadline at the kernel worker (`agent.core.deadline`, `kernel.connection`): a
bound job that the worker has not begun by the deadline fails with Busy and never runs; one it
begins in time runs, however fast the worker asks."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from agent.core import deadline
from agent.core.errors import Busy
from agent.kernel.client import open_kernel

pytestmark = pytest.mark.kernel

FORWARD = Path("/proc/sys/net/ipv4/ip_forward")  # this test's private namespace's


def _children() -> set[int]:
    tid = pid = os.getpid()
    return {int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()}


def _bound(seconds: float) -> deadline.Deadline:
    return deadline.Deadline(time.monotonic() + seconds, seconds)


async def test_bound_jobs_begun_in_time_run_however_fast_the_worker_asks() -> None:
    async with open_kernel() as kernel:
        for _ in range(200):  # the worker often asks before send_all has returned
            token = deadline.CURRENT.set(_bound(5.0))
            try:
                with trio.fail_after(4):
                    routes = await kernel.host_routes()
                assert isinstance(routes, list)  # answered: run, not refused as late
            finally:
                deadline.CURRENT.reset(token)


async def test_a_job_the_stopped_worker_cannot_begin_is_busy_and_never_runs() -> None:
    FORWARD.write_text("0\n")
    before = _children()
    async with open_kernel() as kernel:
        (worker,) = _children() - before
        os.kill(worker, signal.SIGSTOP)
        bound = _bound(0.5)
        token = deadline.CURRENT.set(bound)
        try:
            started = time.monotonic()
            with pytest.raises(Busy, match=r"could not begin within the 0\.5 s"):
                await kernel.set_ip_forward()
            assert time.monotonic() - started < 3  # answered at the deadline, not on resume
            assert bound.at is None  # spent: a rollback after it would run unbound
        finally:
            deadline.CURRENT.reset(token)
            os.kill(worker, signal.SIGCONT)
        await kernel.host_routes()  # the worker has read the job and been told no by now
        await trio.sleep(0.2)
        assert FORWARD.read_text().strip() == "0"  # never applied
        await kernel.set_ip_forward()  # unbound: runs
        assert FORWARD.read_text().strip() == "1"


async def test_the_worker_begins_a_bound_job_without_waiting_for_agentds_loop() -> None:
    """The lane tells agentd it begins a bound job and begins it: it never waits for the Trio
    loop (which, serving 64 clients, answered a verdict late and stalled the lane)."""
    FORWARD.write_text("0\n")
    before = _children()
    async with open_kernel() as kernel, trio.open_nursery() as nursery:
        (worker,) = _children() - before
        os.kill(worker, signal.SIGSTOP)  # the job waits in the socket, unread
        token = deadline.CURRENT.set(_bound(30.0))
        try:
            nursery.start_soon(kernel.set_ip_forward)  # the task copies the context
        finally:
            deadline.CURRENT.reset(token)
        await trio.testing.wait_all_tasks_blocked()  # sent; its caller waits
        os.kill(worker, signal.SIGCONT)
        end = time.monotonic() + 5
        while FORWARD.read_text().strip() != "1" and time.monotonic() < end:
            time.sleep(0.01)  # the Trio loop is held on purpose: it answers nothing
        assert FORWARD.read_text().strip() == "1"  # run while agentd's loop could not answer
