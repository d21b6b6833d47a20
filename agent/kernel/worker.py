"""The kernel worker: a child process of agentd whose owner and reaper threads run the jobs.

Theory of operation: every netlink step runs in the owner thread (or, for batch deletes, the
reaper), one job at a time. In agentd's own process that thread shared the GIL with the Trio
thread, which serves 64 clients at once under churn: the owner waited for the GIL ~17% of its
time (off-CPU `sched_switch` stacks), on top of the kernel's own waits (rtnl, RCU). In a child
process it never waits for Trio: churn +17% (bench_churn), attach latency unchanged.

The child (`python -m agent.kernel.worker`) holds one `agent.kernel.ops.Ops` (sockets, caches,
namespace-id counter). agentd's end (`agent.kernel.connection`) sends requests over a
socketpair, framed as `agent.kernel.jobs` says: (id, job name, args). `serve` looks the job up
in `ops.JOBS`, queues it to its lane (`jobs.lane_of`) and answers (id, ok, result or
exception). Pickle carries `ipaddress` values, `LinkInfo`s and exceptions with their data and
notes; the peer is agentd's own child, on a socketpair nobody else holds. Each lane is one
thread running its jobs in order; the reaper lane has its own socket, so a batch delete never
delays an attach.

Resource handling: the child dies with agentd (PR_SET_PDEATHSIG SIGKILL: a kill -9 of agentd
leaves no worker running queued jobs against the next agentd); it ignores SIGINT and SIGTERM
(systemd signals the whole cgroup: agentd stops it by closing the socket, after its last
call). When the stream ends, the jobs already queued are finished, then the process exits.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from agent.core.errors import Busy, KernelError
from agent.kernel.jobs import FRAME, LANES, Job, lane_of
from agent.kernel.ops import JOBS, Ops
from agent.log import configure

_PR_SET_PDEATHSIG = 1


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at end of stream."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def serve(sock: socket.socket, target: object, table: Mapping[Job, Callable[..., Any]]) -> None:
    """Run the jobs read from `sock` as `table[job](target, *args)`, one thread per lane, until
    the stream ends; then finish the queued jobs and return.

    Error handling:
        Whatever a job raises goes back to its caller (an unpicklable error as a KernelError
        with its text), and so does a KernelError for a job name not in `table`.
    """
    write_lock = threading.Lock()

    def answer(ident: int, ok: bool, value: Any) -> None:
        try:
            data = pickle.dumps((ident, ok, value))
        except Exception as exc:  # an unpicklable result or error: say what it was
            what = f"{type(value).__name__}: {value} (not picklable: {exc})"
            data = pickle.dumps((ident, False, KernelError(what)))
        with write_lock:
            sock.sendall(FRAME.pack(len(data)) + data)

    def begun(ident: int) -> None:
        """Tell agentd that a job bound by a request deadline is about to begin (one way: the
        lane never waits for agentd). Sent BEFORE the clock is read: agentd's caller gives up
        only when, at its deadline, it has not received this (`agent.kernel.connection`)."""
        data = pickle.dumps((ident, None, None))
        with write_lock:
            sock.sendall(FRAME.pack(len(data)) + data)

    def run(jobs: queue.SimpleQueue[Any]) -> None:
        while (job := jobs.get()) is not None:
            ident, fn, args, at = job
            if at is not None:
                begun(ident)
                if time.monotonic() >= at:  # agentd's caller has given up, or will
                    late = Busy("the job did not begin before its deadline", late=True)
                    answer(ident, False, late)
                    continue
            try:
                result = fn(target, *args)
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
        while (head := _recv_exact(sock, FRAME.size)) is not None:
            body = _recv_exact(sock, FRAME.unpack(head)[0])
            if body is None:
                break
            # (id, job, args), or (id, job, args, at): bound by a deadline (monotonic clock)
            ident, job, args, *bound = pickle.loads(body)
            fn = table.get(cast(Job, job))  # the name sent: a StrEnum member hashes as its str
            if fn is None:
                answer(ident, False, KernelError(f"the kernel worker has no job {job!r}"))
                continue
            lanes[lane_of(job)].put((ident, fn, args, bound[0] if bound else None))
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
    with socket.socket(fileno=args.fd) as sock:
        serve(sock, Ops(), JOBS)


if __name__ == "__main__":
    main()
