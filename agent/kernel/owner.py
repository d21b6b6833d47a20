"""Threads the kernel shell runs blocking work in, awaited from Trio.

Theory of operation: the raw netlink sockets are blocking and not thread-safe, so
one dedicated `Owner` thread per kernel shell runs every job in order (DESIGN section 4:
`trio.to_thread`'s cached workers with a shared IPRoute are slower and leak fds). Switching
network namespace (`setns`/`unshare`) changes the calling thread for good, so it happens only in
`run_in_fresh_thread`'s throwaway threads, never in Trio's threads or the owner thread.

A job is atomic with respect to cancellation: once submitted it runs to completion and the
waiting task receives its result; a cancellation is delivered at the caller's next checkpoint.
"""

from __future__ import annotations

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
    """
    return start_in_fresh_thread(fn, *args)()


def start_in_fresh_thread(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start `fn(*args)` in a new throwaway thread; the returned function joins and returns."""
    box: list[outcome.Outcome[T]] = []
    thread = threading.Thread(
        target=lambda: box.append(outcome.capture(fn, *args)), name="netagent-ns", daemon=True
    )
    thread.start()

    def join() -> T:
        thread.join()
        return box[0].unwrap()

    return join


async def run_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await `fn(*args)` run in a new, throwaway thread (see `run_sync_in_fresh_thread`)."""

    def start(report: Callable[[outcome.Outcome[Any]], None]) -> None:
        threading.Thread(
            target=lambda: report(outcome.capture(fn, *args)), name="netagent-ns", daemon=True
        ).start()

    return await _wait_for(start)


class Owner:
    """`threads` threads that run submitted jobs, each job whole, in submission order of start.

    With one thread, jobs also finish in order. With more, jobs run concurrently: callers that
    need an order between two jobs await the first before submitting the second (the service
    does, through its per-namespace and topology locks). Per-thread state lives in
    `threading.local` (the kernel shell keeps one netlink socket per thread).

    Resource handling:
        `start()` launches the threads; `await stop()` runs the queued jobs, then ends them.
    """

    def __init__(self, name: str = "netagent-kernel", threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"an owner needs at least one thread, not {threads}")
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}" if i else name, daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, report = job
            report(outcome.capture(fn, *args))

    def _alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in an owner thread and return its result (or raise its error).

        Cancellation is deferred until the job is done: its effect is never lost.
        """
        if not self._alive():
            raise RuntimeError("kernel owner thread is not running")
        return await _wait_for(lambda report: self._jobs.put((fn, args, report)))

    async def call_each(self, fn: Callable[[], Any]) -> None:
        """Run `fn()` once in every owner thread (per-thread set-up, such as opening a socket).

        Each job waits at a barrier until all have started, so no thread can take two.
        """
        barrier = threading.Barrier(len(self._threads))
        failed: list[BaseException] = []

        def job() -> None:
            try:
                fn()
            finally:
                barrier.wait()

        async def one() -> None:
            try:
                await self.call(job)
            except Exception as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in self._threads:
                nursery.start_soon(one)
        if failed:
            raise failed[0]

    async def stop(self) -> None:
        """Finish the queued jobs and end the threads."""
        threads = [t for t in self._threads if t.is_alive()]
        if not threads:
            return
        for _ in threads:
            self._jobs.put(_STOP)

        def join_all() -> None:
            for thread in threads:
                thread.join()

        await _wait_for(
            lambda report: threading.Thread(
                target=lambda: report(outcome.capture(join_all)), daemon=True
            ).start()
        )
