"""The UDP hot path of the DNS server: one socket's waiting datagrams served from the answer
cache, the rest handed back. Pure-Python twin of `_fast/dnsudp.pyx` (chosen by `agent.accel`).

`Batch(sock, subnet).serve(caches, key, turn)` reads at most `size` datagrams that are waiting
(never blocks) and, for each, in arrival order (`cache` is `caches.get(key)`, looked up once
the datagram is read: what a thread changes in `caches` while another serves is seen by every
datagram read after the change):
- shorter than a DNS header (12 octets) or longer than `MAX_QUERY`: dropped (never a query);
- its source address outside `subnet` (or an IPv6 source with a scope, link-local): dropped;
- the octets after its id a key of `cache`: the reply is the id followed by the cached octets
  (with several cached orders, the next in turn: `turn` goes up by one, order `turn % n`), sent
  to the source at once;
- anything else (a miss: a new question, garbage, a response) goes back to the caller as
  `(datagram, source)`, the source as `socket.recvfrom` gives it, to be handled as before.
It returns `(datagrams read, turn, misses)`. The Cython twin gives the same replies, drops,
turns and misses (tests/core/test_dns_udpbatch.py), with one `recvmmsg` and one `sendmmsg` per
call instead of a `recvfrom` and a `sendto` per datagram.

Error handling: a failed send is ignored (UDP may lose it: a full buffer); a failed read ends
the batch, and is raised (OSError) only when nothing was read (a closed socket: EBADF), as
`recvmmsg` reports it.
"""

from __future__ import annotations

import socket
from typing import Any

HEADER = 12  # octets of a DNS header
MAX_QUERY = 4096  # octets; a longer datagram is never a query this server answers
SIZE = 64  # datagrams per call
SOURCES_MAX = 4096  # remembered source addresses (the dict is emptied when full)

Cache = dict[bytes, tuple[bytes, ...]]


class Subnet:
    """Who may ask: the addresses of "BASE/BITS" in `family` (the server's TCP check uses it
    too; the Cython twin keeps the same mask and base as C integers)."""

    def __init__(self, family: int, subnet: str) -> None:
        self.family = family
        width = 128 if family == socket.AF_INET6 else 32
        base, _, bits = subnet.partition("/")
        self.mask = ((1 << width) - 1) ^ ((1 << (width - int(bits))) - 1)
        self.base = int.from_bytes(socket.inet_pton(family, base), "big") & self.mask

    def allowed(self, source: str) -> bool:
        """Whether `source` (an address as recvfrom gives it) is in the subnet."""
        try:
            number = int.from_bytes(socket.inet_pton(self.family, source), "big")
        except OSError:  # not an address of this family (a link-local one with its scope)
            return False
        return number & self.mask == self.base


class Batch:
    """One UDP socket's hot path (see the module docstring). `subnet` is "BASE/BITS" of the
    socket's family: the sources answered."""

    def __init__(self, sock: socket.socket, subnet: str, size: int = SIZE) -> None:
        if size < 1:
            raise ValueError(f"batch size must be at least 1, not {size}")
        self.sock = sock
        self.size = size
        self.family = sock.family
        self.allowed = Subnet(self.family, subnet).allowed
        self._allowed: dict[str, bool] = {}  # source address -> in the subnet

    def serve(
        self, caches: dict[str, Cache], key: str, turn: int
    ) -> tuple[int, int, list[tuple[bytes, Any]]]:
        """Serve what is waiting (see the module docstring): (read, turn, misses)."""
        recvfrom, sendto, known = self.sock.recvfrom, self.sock.sendto, self._allowed
        misses: list[tuple[bytes, Any]] = []
        read = 0
        while read < self.size:
            try:
                data, peer = recvfrom(MAX_QUERY + 1)
            except BlockingIOError:
                break
            except OSError:
                if read:
                    break
                raise
            read += 1
            if not HEADER <= len(data) <= MAX_QUERY:
                continue
            ok = known.get(peer[0])
            if ok is None:
                if len(known) >= SOURCES_MAX:
                    known.clear()
                ok = known[peer[0]] = self.allowed(peer[0])
            if not ok:
                continue
            cache = caches.get(key)
            hit = None if cache is None else cache.get(data[2:])
            if not hit:
                misses.append((data, peer))
                continue
            if len(hit) == 1:
                reply = data[:2] + hit[0]
            else:
                turn += 1
                reply = data[:2] + hit[turn % len(hit)]
            try:  # noqa: SIM105 - a context manager costs ~0.3 us here
                sendto(reply, peer)
            except OSError:  # a full buffer: UDP is allowed to lose it
                pass
        return read, turn, misses
