"""The request deadline at the kernel worker (`agent.core.deadline`, `kernel.connection`): a
bound job that the worker has not begun by the deadline fails with Busy and never runs; one it
begins in time runs, however fast the worker says so, and is waited for however long it runs;
the worker says "begun" before it reads the clock and never waits for agentd to answer."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent.core import deadline
from agent.core.errors import Busy
from agent.kernel import connection, worker
from agent.kernel.client import open_kernel
from agent.kernel.jobs import FRAME, Job

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


# --- both ends of the decision, with the other end played by the test ---------------------


def _frame(sock: socket.socket, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message)
    sock.sendall(FRAME.pack(len(data)) + data)


def _read(sock: socket.socket) -> tuple[Any, ...]:
    size = FRAME.unpack(sock.recv(FRAME.size, socket.MSG_WAITALL))[0]
    message: tuple[Any, ...] = pickle.loads(sock.recv(size, socket.MSG_WAITALL))
    return message


def test_the_worker_says_begun_before_it_reads_the_clock_and_refuses_late_jobs() -> None:
    ran: list[int] = []
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    table = {"add": lambda target, a, b: ran.append(a + b) or a + b}
    thread = threading.Thread(target=worker.serve, args=(theirs, None, table), daemon=True)
    thread.start()
    try:
        _frame(ours, (1, "add", (2, 3), time.monotonic() + 30))  # in time: begun, then run
        assert _read(ours) == (1, None, None)
        assert _read(ours) == (1, True, 5)
        _frame(ours, (2, "add", (1, 1), time.monotonic() - 1))  # late: begun, then refused
        assert _read(ours) == (2, None, None)
        ident, ok, error = _read(ours)
        assert (ident, ok, type(error), error.data) == (2, False, Busy, {"late": True})
        _frame(ours, (3, "add", (1, 2)))  # unbound: no "begun"
        assert _read(ours) == (3, True, 3)
    finally:
        ours.close()
        thread.join(5)
    assert ran == [5, 3]  # the late job never ran


async def test_a_job_begun_before_the_deadline_is_waited_for_however_long_it_runs() -> None:
    """The caller decides at the deadline from what the worker has sent by then, read at that
    moment: here nothing else reads the socket until after the deadline ("begun" waits there
    unread), and the answer comes after it. A job begun in time is never reported Busy."""
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(["sleep", "60"])  # stands for the worker process
    conn = connection.WorkerConnection(process, ours)
    go = threading.Event()

    def play_worker() -> None:
        ident, _job, _args, at = _read(theirs)
        go.wait(5)
        _frame(theirs, (ident, None, None))  # begun, in time
        time.sleep(max(0.0, at - time.monotonic()) + 0.2)
        _frame(theirs, (ident, True, "answered"))  # after the deadline

    thread = threading.Thread(target=play_worker, daemon=True)
    thread.start()
    try:
        async with trio.open_nursery() as nursery:
            box: list[Any] = []

            async def caller() -> None:
                box.append(await conn.call(Job.HOST_ROUTES, ()))

            token = deadline.CURRENT.set(_bound(0.3))
            try:
                nursery.start_soon(caller)
            finally:
                deadline.CURRENT.reset(token)
            await trio.testing.wait_all_tasks_blocked()  # the job is sent
            go.set()
            await trio.sleep(0.45)  # past the deadline: the caller has decided by now
            nursery.start_soon(conn.serve)  # from now on, answers are routed
            with trio.fail_after(5):
                while not box:
                    await trio.sleep(0.01)
            assert box == ["answered"]
            process.kill()  # the stand-in exits at once, as the worker does when agentd hangs up
            await conn.stop()
    finally:
        process.kill()
        process.wait()
        thread.join(5)
        theirs.close()
