"""Threads the kernel shell runs blocking work in, awaited from Trio.

Theory of operation: the raw netlink sockets are blocking and not thread-safe, so
one dedicated `Owner` thread per kernel shell runs every job in order (DESIGN section 4:
`trio.to_thread`'s cached workers with a shared IPRoute are slower and leak fds). Switching
network namespace (`setns`/`unshare`) changes the calling thread: it happens in
`run_in_fresh_thread`'s throwaway threads, which never go back, and in the owner thread only
for one `socket()` call, which comes straight back (`netns.socket_visiting`); never in Trio's
threads.

A job is atomic with respect to cancellation: once submitted it runs to completion and the
waiting task receives its result; a cancellation is delivered at the caller's next checkpoint.
"""

from __future__ import annotations

import _thread
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


async def _wait_for(start: Callable[[Callable[[outcome.Outcome[Any]], None]], None]) -> Any:
    """Call `start(report)`; wait (shielded) until another thread calls `report(result)`."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: list[outcome.Outcome[Any]] = []

    def report(result: outcome.Outcome[Any]) -> None:
        box.append(result)
        with contextlib.suppress(trio.RunFinishedError):  # the run ended: nobody waits
            token.run_sync_soon(done.set)

    start(report)
    with trio.CancelScope(shield=True):
        await done.wait()
    return box[0].unwrap()


def run_sync_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in a new thread that exits afterwards; block until it is done.

    For code that changes the thread's namespace: nothing else ever runs in that thread.
    A bare `_thread` thread (`threading.Thread.start` waits until the thread runs).
    """
    box: list[outcome.Outcome[T]] = []
    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            box.append(outcome.capture(fn, *args))
        finally:
            done.release()

    _thread.start_new_thread(run, ())
    with done:
        return box[0].unwrap()


async def run_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await `fn(*args)` run in a new, throwaway thread (see `run_sync_in_fresh_thread`)."""

    def start(report: Callable[[outcome.Outcome[Any]], None]) -> None:
        threading.Thread(
            target=lambda: report(outcome.capture(fn, *args)), name="netagent-ns", daemon=True
        ).start()

    return await _wait_for(start)


class Owner:
    """One thread that runs submitted jobs in order.

    Resource handling:
        `start()` launches the thread; `await stop()` runs the queued jobs, then ends it.
    """

    def __init__(self, name: str = "netagent-kernel") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, report = job
            report(outcome.capture(fn, *args))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the owner thread and return its result (or raise its error).

        Cancellation is deferred until the job is done: its effect is never lost.
        """
        if not self._thread.is_alive():
            raise RuntimeError("kernel owner thread is not running")
        return await _wait_for(lambda report: self._jobs.put((fn, args, report)))

    async def stop(self) -> None:
        """Finish the queued jobs and end the thread."""
        if not self._thread.is_alive():
            return
        self._jobs.put(_STOP)
        await _wait_for(
            lambda report: threading.Thread(
                target=lambda: report(outcome.capture(self._thread.join)), daemon=True
            ).start()
        )
