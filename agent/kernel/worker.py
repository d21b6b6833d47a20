"""The kernel shell's two threads (owner and reaper) in a child process of agentd.

Theory of operation: every netlink step runs in the owner thread (or, for batch deletes, the
reaper), one job at a time. In agentd's own process that thread shared the GIL with the Trio
thread, which serves 64 clients at once under churn: the owner waited for the GIL ~17% of its
time (off-CPU `sched_switch` stacks), on top of the kernel's own waits (rtnl, RCU). In a child
process it never waits for Trio: churn +17% (bench_churn), attach latency unchanged.

The child (`python -m agent.kernel.worker`) holds the one `Kernel` whose owner-side methods
(`_attach`, `_retire`, `_reap`, ...) do the work, with its sockets, caches and namespace-id
counter. agentd's `Kernel` keeps the Trio-side methods, which validate and then `call` the
same-named method over a socketpair: a frame is a 4-byte length and a pickle of
(id, lane, method name, args), answered by (id, ok, result or exception). Pickle carries
msgspec structs, `ipaddress` values and exceptions with their data and notes; the peer is
agentd's own child, on a socketpair nobody else holds. Each lane is one thread running its
jobs in order, as before; the reaper lane has its own socket, so a batch delete never delays
an attach.

Resource handling: the child dies with agentd (PR_SET_PDEATHSIG SIGKILL: a kill -9 of agentd
leaves no worker running queued jobs against the next agentd); it ignores SIGINT and SIGTERM
(systemd signals the whole cgroup: agentd stops it by closing the socket, after its last
call). A job is atomic with respect to cancellation: once sent, the caller waits (shielded)
for its answer. If the child dies, every waiting and later call fails with KernelError and
`WorkerConnection.serve` raises: agentd stops (systemd restarts it; adoption converges).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import trio

from agent.core.errors import KernelError
from agent.log import configure, get_logger

log = get_logger("agent.kernel.worker")

LANES = ("owner", "reaper")
_LEN = struct.Struct("=I")
_PR_SET_PDEATHSIG = 1


# --- the child -----------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at end of stream."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def serve(sock: socket.socket, target: Any) -> None:
    """Run the requests read from `sock` on `target`'s methods, one thread per lane, until the
    stream ends; then finish the queued jobs and return."""
    write_lock = threading.Lock()

    def answer(ident: int, ok: bool, value: Any) -> None:
        try:
            data = pickle.dumps((ident, ok, value))
        except Exception as exc:  # an unpicklable result or error: say what it was
            what = f"{type(value).__name__}: {value} (not picklable: {exc})"
            data = pickle.dumps((ident, False, KernelError(what)))
        with write_lock:
            sock.sendall(_LEN.pack(len(data)) + data)

    def run(jobs: queue.SimpleQueue[Any]) -> None:
        while (job := jobs.get()) is not None:
            ident, name, args = job
            try:
                result = getattr(target, name)(*args)
            except BaseException as exc:  # every error goes back to its caller
                answer(ident, False, exc)
            else:
                answer(ident, True, result)

    lanes: dict[str, queue.SimpleQueue[Any]] = {name: queue.SimpleQueue() for name in LANES}
    threads = [
        threading.Thread(target=run, args=(jobs,), name=f"netagent-{name}")
        for name, jobs in lanes.items()
    ]
    for thread in threads:
        thread.start()
    try:
        while (head := _recv_exact(sock, _LEN.size)) is not None:
            body = _recv_exact(sock, _LEN.unpack(head)[0])
            if body is None:
                break
            ident, lane, name, args = pickle.loads(body)
            lanes[lane].put((ident, name, args))
    finally:
        for jobs in lanes.values():
            jobs.put(None)
        for thread in threads:
            thread.join()


def _die_with(parent: int) -> None:
    """SIGKILL when agentd exits; exit now if it already has (it died before the prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="agent.kernel.worker")
    ap.add_argument("fd", type=int)
    ap.add_argument("parent", type=int)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--log-format", default="json")
    args = ap.parse_args(argv)
    _die_with(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure(args.log_level, args.log_format)
    from agent.kernel.links import Kernel  # the child's only import of the shell proper

    with socket.socket(fileno=args.fd) as sock:
        serve(sock, Kernel(NO_LANE, NO_LANE))


# --- agentd's side -------------------------------------------------------------------------


class JobRunner(Protocol):
    """Where `Kernel` sends a job: `await runner.call(kernel._method, *args)`."""

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class _NoLane:
    """The lanes of the child's own `Kernel`: its owner-side methods are called directly."""

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise RuntimeError("the worker's Kernel runs jobs, it sends none")


NO_LANE = _NoLane()


class Lane:
    """One lane of the worker: `await lane.call(kernel._method, *args)` runs it there."""

    def __init__(self, conn: WorkerConnection, name: str) -> None:
        self._conn, self._name = conn, name

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._conn.call(self._name, fn.__name__, args)


class WorkerConnection:
    """agentd's end of the socketpair and the worker process: sends jobs, and (`serve`) routes
    the answers back.

    Resource handling:
        Made by `start`; `serve` runs in a task for as long as the worker is used; `stop`
        closes agentd's end (the worker finishes its queued jobs and exits) and reaps it.

    Error handling:
        After the worker is gone, every waiting and later call raises KernelError.
    """

    def __init__(self, process: subprocess.Popen[bytes], stream: trio.SocketStream) -> None:
        self.process = process
        self._stream = stream
        self._send_lock = trio.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._gone: str | None = None
        self._stopping = False

    def lane(self, name: str) -> Lane:
        return Lane(self, name)

    async def call(self, lane: str, name: str, args: tuple[Any, ...]) -> Any:
        """Run `name(*args)` in `lane` of the worker; its result, or raise its error."""
        if self._gone is not None:
            raise KernelError(self._gone)
        self._next += 1
        ident, done, box = self._next, trio.Event(), []
        self._waiting[ident] = (done, box)
        frame = pickle.dumps((ident, lane, name, args))
        with trio.CancelScope(shield=True):  # sent means done: its effect is never lost
            try:
                async with self._send_lock:
                    await self._stream.send_all(_LEN.pack(len(frame)) + frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._waiting.pop(ident, None)
                raise KernelError(self._gone or "the kernel worker is gone") from None
            await done.wait()
        ok, value = box
        if ok:
            return value
        raise value

    async def serve(self) -> None:
        """Route answers to their callers until the stream ends. Unless `stop` ended it, fail
        every caller left and raise KernelError: a worker gone under agentd is fatal."""
        buf = bytearray()
        try:
            while chunk := await self._stream.receive_some(1 << 16):
                buf += chunk
                while len(buf) >= _LEN.size:
                    size = _LEN.unpack_from(buf)[0]
                    if len(buf) < _LEN.size + size:
                        break
                    ident, ok, value = pickle.loads(buf[_LEN.size : _LEN.size + size])
                    del buf[: _LEN.size + size]
                    done, box = self._waiting.pop(ident)
                    box[:] = [ok, value]
                    done.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self._stopping:
            self._fail_all("the kernel worker was stopped")
            return
        await self._wait(1.0)
        why = f"the kernel worker exited (status {self.process.returncode})"
        log.error("kernel.worker.exited", status=self.process.returncode)
        self._fail_all(why)
        raise KernelError(why)

    def _fail_all(self, why: str) -> None:
        self._gone = why
        waiting, self._waiting = self._waiting, {}
        for done, box in waiting.values():
            box[:] = [False, KernelError(why)]
            done.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """Close agentd's end (the worker runs what it was sent, then exits) and reap it;
        killed if it has not exited within `timeout` seconds."""
        self._stopping = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
            if not await self._wait(timeout):
                log.warning("kernel.worker.killed", timeout_s=timeout)
                self.process.kill()
                await self._wait(None)

    async def _wait(self, timeout: float | None) -> bool:
        """Wait (in a thread) up to `timeout` seconds for the worker to exit; True if it has."""
        try:
            await trio.to_thread.run_sync(partial(self.process.wait, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True


async def start(log_level: str = "info", log_format: str = "json") -> WorkerConnection:
    """Spawn the worker (it dies with this process) and connect to it.

    Spawned by the calling (Trio) thread itself, not by `trio.lowlevel.open_process`, which
    forks from a cached worker thread: PR_SET_PDEATHSIG fires when the *thread* that forked
    exits, and trio's idle threads exit after 10 s. `-P`: the current directory stays off the
    module path.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
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
    return WorkerConnection(process, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))


if __name__ == "__main__":
    main()
