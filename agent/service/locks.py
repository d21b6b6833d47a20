"""The service's locks: one readers-writer lock over the topology, and per-namespace locks.

Theory of operation. Endpoint requests (connect, disconnect, ports) only touch their own
namespace and one network, so many of them may be in flight at once (shared mode): each one
decides and reserves synchronously (no await between a check and the reservation it allows), then
waits for the kernel while others proceed, so the kernel thread is never idle while requests
queue. Requests on the same namespace are serialised by a per-namespace lock, so their effects
and events keep their order. Network-wide requests (create, rm, prune, run, repairs) take the
lock exclusively: they wait for endpoint requests in flight and hold new ones back (a waiting
writer is not starved by a stream of readers).

Once the agent is stopping, every new request is refused with Busy instead of waiting.

Cancellation: a request cancelled while it waits for either mode leaves the locks as it found
them (tests/core/test_locks.py), so a request deadline or a client hanging up never wedges
the writers behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from agent.core.errors import Busy


def _shutting_down() -> Busy:
    return Busy("agentd is shutting down; retry when it is back", reason="shutdown")


class TopologyLock:
    """Readers-writer lock with a turnstile; `async with lock:` is the exclusive (writer) mode."""

    def __init__(self) -> None:
        self.closing = False
        self._turnstile = trio.Lock()  # writers hold it while they wait and work
        self._readers = 0
        self._no_readers = trio.Event()
        self._no_readers.set()

    async def __aenter__(self) -> None:
        await self._turnstile.acquire()
        try:
            if self.closing:
                raise _shutting_down()
            await self._no_readers.wait()
        except BaseException:  # cancelled (or refused) while waiting: never keep the turnstile
            self._turnstile.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._turnstile.release()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Shared (reader) mode: for requests confined to one namespace."""
        async with self._turnstile:  # wait behind a writer, if one is waiting or working
            if self.closing:
                raise _shutting_down()
            self._readers += 1
            if self._readers == 1:
                self._no_readers = trio.Event()
        try:
            yield
        finally:
            self._readers -= 1
            if self._readers == 0:
                self._no_readers.set()

    async def drain(self) -> None:
        """Refuse new requests; wait for those in flight (shared or exclusive) to finish."""
        self.closing = True
        await self._turnstile.acquire()
        try:
            await self._no_readers.wait()
        finally:
            self._turnstile.release()


class KeyedLocks:
    """One lock per key (a namespace), created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
