"""agentd's end of the kernel worker: spawning it, sending it jobs, routing its answers.

Theory of operation: `start` spawns `python -m agent.kernel.worker` with one end of a
socketpair; `WorkerConnection.call` sends a job by name (`agent.kernel.jobs`) and waits for its
answer, which `serve` (a task) routes back by request id. A job is atomic with respect to
cancellation: once sent, the caller waits (shielded) for its answer, so its effect is never
lost. If the child dies, every waiting and later call fails with KernelError and `serve`
raises: agentd stops (systemd restarts it; adoption converges).

A request's first job is bound by its deadline (`agent.core.deadline`): it is sent with its
deadline `at` (CLOCK_MONOTONIC, the same clock in both processes). The worker's lane, before
beginning it, sends a one-way "begun" frame and only THEN reads the clock: at or past `at`, it
answers Busy and never runs the job. The caller waits for the answer until `at`; then it
reads, without waiting, every frame the worker has sent by now (`_pump`), and gives up with
Busy only if neither the answer nor "begun" is among them. The two cannot cross: a "begun"
not yet in agentd's socket at its decision (at or after `at`) is sent after it, so the lane
reads the clock after `at` too, and refuses. Nobody waits for anybody: the lane used to ask
agentd and wait for its verdict before each bound job, which put the Trio loop's latency
under 64 clients into the owner lane, one job at a time (see docs/ARCHITECTURE.md, "The
kernel worker", for the figures).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

import trio

from agent.core import deadline
from agent.core.errors import Busy, KernelError
from agent.kernel.jobs import FRAME, Job
from agent.log import get_logger

log = get_logger("agent.kernel.worker")

STOP_GRACE = 10.0  # seconds the worker has to finish its queued jobs once agentd hangs up


class WorkerConnection:
    """agentd's end of the socketpair and the worker process: sends jobs, and (`serve`) routes
    the answers back.

    Resource handling:
        Made by `start`; `serve` runs in a task for as long as the worker is used; `stop`
        closes agentd's end (the worker finishes its queued jobs and exits) and reaps it.

    Error handling:
        After the worker is gone, every waiting and later call raises KernelError.
    """

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self._sock = sock  # read directly (`_pump`), so a caller can drain it at its deadline
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._send_lock = trio.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        # deadline-bound jobs not yet begun: id -> set once the worker says it begins it (or
        # the worker is gone); a caller that gave up removes its entry
        self._asks: dict[int, trio.Event] = {}
        self._buf = bytearray()
        self._eof = False
        self._gone: str | None = None
        self._stopping = False

    async def call(self, job: Job, args: tuple[Any, ...]) -> Any:
        """Run `job` with `args` in the worker; its result, or raise its error.

        Error handling:
            Busy if the request's deadline (`agent.core.deadline`) passes before the worker
            begins the job: it is then never run.
        """
        if self._gone is not None:
            raise KernelError(self._gone)
        bound = deadline.CURRENT.get()
        at = bound.take() if bound is not None else None
        if at is not None and time.monotonic() >= at:
            raise _late(bound, job)
        self._next += 1
        ident, done = self._next, trio.Event()
        box: list[Any] = []
        self._waiting[ident] = (done, box)
        if at is not None:  # before sending: "begun" may come before send_all returns
            begun = self._asks[ident] = trio.Event()
        frame = pickle.dumps(
            (ident, job.value, args) if at is None else (ident, job.value, args, at)
        )
        with trio.CancelScope(shield=True):  # sent means done: its effect is never lost
            try:
                await self._send(FRAME.pack(len(frame)) + frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._waiting.pop(ident, None)
                self._asks.pop(ident, None)
                raise KernelError(self._gone or "the kernel worker is gone") from None
            if at is not None and not await self._answered_or_begun(done, begun, at):
                self._asks.pop(ident, None)  # the worker refuses it when it gets to it
                raise _late(bound, job)
            if not done.is_set():
                await done.wait()
        ok, value = box
        if ok:
            return value
        if at is not None and isinstance(value, Busy) and value.data.get("late"):
            raise _late(bound, job)  # refused by the lane: it read the clock after `at`
        raise value

    async def _send(self, data: bytes) -> None:
        """Send one frame whole: at once when the socket takes it all (the usual case: no
        Trio machinery), else through the stream; frames never interleave (the lock)."""
        if self._send_lock.locked():
            async with self._send_lock:
                await self._stream.send_all(data)
            return
        self._send_lock.acquire_nowait()
        try:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                await self._stream.send_all(data[sent:])
        finally:
            self._send_lock.release()

    async def _answered_or_begun(self, done: trio.Event, begun: trio.Event, at: float) -> bool:
        """Wait for the answer until `at`; then, whether it came or the worker has said it
        begins the job (reading, at that moment, whatever it sent: see the module docstring).
        One wait per job: "begun" wakes nobody."""
        while not done.is_set() and (left := at - time.monotonic()) > 0:
            with trio.move_on_after(left):
                await done.wait()
        if not (done.is_set() or begun.is_set()):
            self._pump()  # what the worker sent before now: a "begun" sent later is refused
        return done.is_set() or begun.is_set()

    async def serve(self) -> None:
        """Route answers to their callers until the stream ends. Unless `stop` ended it, fail
        every caller left and raise KernelError: a worker gone under agentd is fatal."""
        try:
            while not self._eof:
                await trio.lowlevel.wait_readable(self._sock)
                self._pump()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self._stopping:
            self._fail_all("the kernel worker was stopped")
            return
        with trio.move_on_after(1.0):
            await self._exited()
        why = f"the kernel worker exited (status {self.process.returncode})"
        log.error("kernel.worker.exited", status=self.process.returncode)
        self._fail_all(why)
        raise KernelError(why)

    def _pump(self) -> None:
        """Read every frame the worker has sent by now, without waiting, and route it: an
        answer to its caller, a "begun" to the caller waiting for it."""
        while not self._eof:
            try:
                chunk = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:  # reset, or closed by `stop`
                chunk = b""
            if not chunk:
                self._eof = True
            self._buf += chunk
        buf = self._buf
        while len(buf) >= FRAME.size:
            size = FRAME.unpack_from(buf)[0]
            if len(buf) < FRAME.size + size:
                break
            ident, ok, value = pickle.loads(buf[FRAME.size : FRAME.size + size])
            del buf[: FRAME.size + size]
            if ok is None:  # "begun": the worker is about to read the clock and begin it
                if (begun := self._asks.pop(ident, None)) is not None:
                    begun.set()
                continue
            done, box = self._waiting.pop(ident)
            box[:] = [ok, value]
            done.set()

    def _fail_all(self, why: str) -> None:
        self._gone = why
        asks, self._asks = self._asks, {}
        for begun in asks.values():
            begun.set()
        waiting, self._waiting = self._waiting, {}
        for done, box in waiting.values():
            box[:] = [False, KernelError(why)]
            done.set()

    async def stop(self) -> None:
        """Close agentd's end (the worker runs what it was sent, then exits) and reap it;
        killed if it has not exited within `STOP_GRACE` seconds."""
        self._stopping = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
            with trio.move_on_after(STOP_GRACE) as scope:
                await self._exited()
            if scope.cancelled_caught:
                log.warning("kernel.worker.killed", timeout_s=STOP_GRACE)
                self.process.kill()
                await self._exited()

    async def _exited(self) -> None:
        """Until the worker has exited, then reap it (cancellable: a pidfd becomes readable
        when the process exits, as trio's own `Process.wait` does it on Linux)."""
        if self.process.returncode is None:
            fd = os.pidfd_open(self.process.pid)
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        self.process.wait()  # it has exited: this only reaps it


def _late(bound: deadline.Deadline | None, job: Job) -> Busy:
    seconds = bound.seconds if bound is not None else 0.0
    return Busy(
        f"agentd is busy: the kernel work of this request could not begin within the "
        f"{seconds:g} s request timeout (nothing was changed); retry",
        job=str(job),
        timeout_s=seconds,
    )


async def start(log_level: str = "info", log_format: str = "json") -> WorkerConnection:
    """Spawn the worker (it dies with this process) and connect to it.

    Spawned by the calling (Trio) thread itself, not by `trio.lowlevel.open_process`, which
    forks from a cached worker thread: PR_SET_PDEATHSIG fires when the *thread* that forked
    exits, and trio's idle threads exit after 10 s. `-P`: the current directory stays off the
    module path.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # a blocking spawn on purpose: see the docstring (PDEATHSIG follows this thread)
        process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-P", "-m", "agent.kernel.worker", str(theirs.fileno()),
             str(os.getpid()), "--log-level", log_level, "--log-format", log_format],
            pass_fds=(theirs.fileno(),),
        )  # fmt: skip
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    await trio.lowlevel.checkpoint()
    return WorkerConnection(process, ours)
