"""One thread that serves every DNS UDP socket's cached answers, off the Trio loop.

Why (docs/ARCHITECTURE.md, "Names (DNS)"): served from the Trio loop, each wake-up of a UDP
socket cost ~14 us of the run loop's Python (epoll_ctl, the scheduler, the task's step), about
40% of a query's CPU when queries come one at a time, and every step of another task
(a request handler's: up to ~46 ms under churn) delayed the queries waiting behind it.

How: one `select.epoll` over every registered socket and a wake-up pipe, waited on with the GIL
released; for each readable socket its batch (`agent.accel.dnsudp`) answers the cache hits and
returns the misses, which go to the Trio loop (`TrioToken.run_sync_soon`) to be parsed,
answered or forwarded there exactly as before. The cache is the server's dict: the batch looks
a network's cache up after its read, holding the GIL, so an answer forgotten by the Trio thread
(a disconnect) is never served to a query read after that. Round robin keeps its own turn.

Resource handling: `add` and `remove` are called from the Trio thread; `remove` waits for the
socket's batch in progress to finish (a lock held around each batch), so that the caller may
close the socket at once: a socket is never closed, and its number never reused, under a batch.
`close` wakes the thread, which exits, and joins it.

Flow control: at most `MAX_QUEUED` batches of misses wait for the Trio thread; past that,
misses are dropped (counted in `dropped`) until it catches up, so a flood of new questions or
garbage from a container costs bounded memory. Cached answers are served meanwhile.

Error handling: a failing read (a socket being closed) skips that socket; anything unexpected
in a batch is logged and the thread goes on (a dead thread would be a silent DNS outage).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from typing import Any

import trio

from agent.log import get_logger

log = get_logger("agent.dns")

Misses = list[tuple[bytes, Any]]

#: batches of misses handed to the Trio thread and not yet handled, beyond which more misses
#: are dropped (UDP may lose them): a container flooding its gateway with new questions or
#: garbage must not grow agentd's memory faster than the Trio thread works it off
MAX_QUEUED = 64


class UdpThread:
    """The thread (see the module docstring). `caches` is the server's network -> cache dict;
    `on_misses(listener, misses)` runs in the Trio thread."""

    def __init__(self, caches: dict[str, Any], on_misses: Callable[[Any, Misses], None]) -> None:
        self._caches = caches
        self._on_misses = on_misses
        self._token = trio.lowlevel.current_trio_token()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._listeners: dict[int, Any] = {}  # socket's fd -> its listener
        self._lock = threading.Lock()
        self._turn = 0
        # batches of misses handed over and handled: each counter written by one thread only
        self._handed = 0
        self._handled = 0
        self.dropped = 0  # misses dropped for want of room (the thread's count)
        self._thread = threading.Thread(target=self._run, name="netagent-dns-udp", daemon=True)
        self._thread.start()

    def add(self, listener: Any) -> None:
        """Serve `listener`'s UDP socket (its `udp`, `batch`, `net_id`)."""
        fd = listener.udp.fileno()
        with self._lock:
            self._listeners[fd] = listener
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, listener: Any) -> None:
        """Stop serving `listener`'s socket; once this returns, it may be closed."""
        with self._lock:
            for fd, known in list(self._listeners.items()):
                if known is listener:
                    del self._listeners[fd]
                    with contextlib.suppress(OSError):  # closed already: epoll dropped it
                        self._epoll.unregister(fd)

    def close(self) -> None:
        """Stop the thread and wait for it (it is between two batches within microseconds)."""
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                if fd == self._wake_r:
                    return
                with self._lock:
                    listener = self._listeners.get(fd)
                    if listener is None:  # removed since the poll
                        continue
                    try:
                        _, self._turn, misses = listener.batch.serve(
                            self._caches, listener.net_id, self._turn
                        )
                    except OSError:
                        continue
                    except Exception:  # logged: the thread must live on
                        log.exception("dns.udp.batch.failed", network=listener.net_id)
                        continue
                if not misses:
                    continue
                if self._handed - self._handled >= MAX_QUEUED:
                    self.dropped += len(misses)
                    continue
                self._handed += 1
                try:
                    self._token.run_sync_soon(self._deliver, listener, misses)
                except trio.RunFinishedError:
                    return

    def _deliver(self, listener: Any, misses: Misses) -> None:
        """In the Trio thread: one batch of misses, counted as handled."""
        self._handled += 1
        self._on_misses(listener, misses)
