"""The event bus behind `events.subscribe` (and `agentctl events`).

Theory of operation: events are published in one Trio thread, so they are totally ordered
(`seq`); requests on one namespace are serialised (`agent.service.locks`), so each object's events
arrive in the order they happened. Each subscriber has
a bounded queue; publishing never blocks: a subscriber too slow to keep up is closed (its
stream ends with an error) rather than slowing the agent down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import trio

from agent.core.events import Event

QUEUE = 1024


class EventBus:
    """Publishes core `Event`s to every subscriber (see the module docstring)."""

    def __init__(self) -> None:
        self._seq = 0
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()
        #: called with each event as it is published, before the request that made it is
        #: answered (agentd's DNS server updates its records so); must not block or raise
        self.listeners: list[Callable[[Event], None]] = []

    def publish(self, type: str, action: str, id: str, **attributes: object) -> Event:
        """Number and timestamp an event, and hand it to every subscriber without waiting."""
        self._seq += 1
        event = Event(
            seq=self._seq, time=time.time(), type=type, action=action, id=id,
            attributes={k: str(v) for k, v in attributes.items()},
        )  # fmt: skip
        for listener in self.listeners:
            listener(event)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(send)
                send.close()
        return event

    async def subscribe(self, types: list[str]) -> AsyncIterator[Event]:
        """Events from now on (optionally only these `types`), until the caller stops."""
        send, receive = trio.open_memory_channel[Event](QUEUE)
        self._subscribers.add(send)
        try:
            async with receive:
                async for event in receive:
                    if not types or event.type in types:
                        yield event
        finally:
            self._subscribers.discard(send)
            send.close()
