"""The service's locks: exclusive vs shared, shutdown, and cancellation while waiting."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agent.core.errors import Busy
from agent.service.locks import KeyedLocks, TopologyLock


async def test_a_writer_cancelled_while_waiting_for_readers_does_not_keep_the_lock() -> None:
    lock = TopologyLock()
    reader_done = trio.Event()

    async def reader(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with lock.shared():
            task_status.started()
            await reader_done.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(reader)
        with trio.move_on_after(0.05) as scope:  # waits for the reader: a request deadline
            async with lock:
                pytest.fail("the writer got in while a reader held the lock")
        assert scope.cancelled_caught
        reader_done.set()
    with trio.fail_after(1):  # a later writer and reader get in: nothing was left held
        async with lock:
            pass
        async with lock.shared():
            pass


async def test_a_reader_cancelled_behind_a_writer_leaves_no_trace() -> None:
    lock = TopologyLock()
    release = trio.Event()

    async def writer(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with lock:
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(writer)
        with trio.move_on_after(0.05):
            async with lock.shared():
                pytest.fail("a reader got in beside a writer")
        release.set()
    with trio.fail_after(1):
        async with lock:  # no reader was counted: the writer does not wait for a ghost
            pass


async def test_writers_exclude_readers_and_readers_share() -> None:
    lock = TopologyLock()
    inside: list[str] = []

    async def read(name: str) -> None:
        async with lock.shared():
            inside.append(name)
            await trio.sleep(0.01)
            assert "w" not in inside
            inside.remove(name)

    async def write() -> None:
        async with lock:
            assert not inside
            inside.append("w")
            await trio.sleep(0.01)
            inside.remove("w")

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(read, f"r{i}")
        nursery.start_soon(write)
        for i in range(3, 6):
            nursery.start_soon(read, f"r{i}")


async def test_drain_refuses_new_requests_with_busy() -> None:
    lock = TopologyLock()
    await lock.drain()
    with pytest.raises(Busy):
        async with lock:
            pass
    with pytest.raises(Busy):
        async with lock.shared():
            pass


async def test_keyed_locks_are_dropped_when_unused_even_after_a_cancel() -> None:
    locks = KeyedLocks()
    held = trio.Event()
    release = trio.Event()

    async def holder() -> None:
        async with locks.hold("ns"):
            held.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await held.wait()
        with trio.move_on_after(0.02):
            async with locks.hold("ns"):
                pytest.fail("two holders of one key")
        release.set()
    assert locks._locks == {}
