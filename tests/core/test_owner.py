"""The kernel shell's job threads (`agent.kernel.owner.Owner`): no kernel needed."""

from __future__ import annotations

import threading

import pytest
import trio

from agent.kernel.owner import Owner


@pytest.fixture
async def pool():
    owner = Owner("test-owner", threads=3)
    owner.start()
    yield owner
    await owner.stop()


async def test_call_each_runs_once_in_every_thread(pool) -> None:
    seen: list[str] = []
    await pool.call_each(lambda: seen.append(threading.current_thread().name))
    assert sorted(seen) == ["test-owner", "test-owner-1", "test-owner-2"]


async def test_jobs_run_side_by_side(pool, nursery) -> None:
    # each job waits for the other: with a single thread this would never finish
    first, second = threading.Event(), threading.Event()

    def a() -> str:
        first.set()
        assert second.wait(5)
        return "a"

    def b() -> str:
        second.set()
        assert first.wait(5)
        return "b"

    results: list[str] = []

    async def run(fn) -> None:
        results.append(await pool.call(fn))

    nursery.start_soon(run, a)
    nursery.start_soon(run, b)
    await pool.call(lambda: None)
    while len(results) < 2:
        await trio.sleep(0.01)
    assert sorted(results) == ["a", "b"]


async def test_errors_reach_the_caller_and_stop_ends_every_thread() -> None:
    owner = Owner("t", threads=2)
    owner.start()

    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await owner.call(boom)
    with pytest.raises(ValueError, match="no"):
        await owner.call_each(boom)
    await owner.stop()
    assert not any(t.is_alive() for t in owner._threads)
    with pytest.raises(RuntimeError):
        await owner.call(lambda: None)


def test_an_owner_needs_a_thread() -> None:
    with pytest.raises(ValueError):
        Owner(threads=0)
