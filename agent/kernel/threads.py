"""Throwaway threads for work that changes the calling thread's namespace, awaited from Trio.

Theory of operation: `setns`/`unshare` switch only the calling thread, and a thread that
switched must never run anything meant for another namespace. So that work runs in a thread
made for it here, which exits afterwards and never goes back (`netns.create_named`); never
in Trio's cached worker threads, which run anything next. The
kernel worker's owner thread (`agent.kernel.worker`) is the one exception: it enters a
namespace for one `socket()` call and comes straight back (`netns.socket_visiting`).

A call is atomic with respect to cancellation: once started it runs to completion and the
waiting task receives its result; a cancellation is delivered at the caller's next checkpoint.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


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

    result: T = await _wait_for(start)
    return result
