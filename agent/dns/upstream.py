"""Forwarding: the host's upstream resolvers and one query sent to them.

Theory of operation. Names that are not an agent network's own go to the host's resolvers:
those `agentd --dns-upstream` names, else the `nameserver` lines of the host's resolv.conf,
read at start and again when the file changes (its mtime and size, checked at most once a
second, on the forwarding path only). A query is sent as received (same id, same bytes) over
UDP to each server in turn, each given an equal share of what is left of `TIMEOUT`; an answer
with TC set is asked again over TCP from the same server (RFC 7766). A server that refuses
(ICMP port unreachable) is skipped at once, so with every server down the client gets its
SERVFAIL in well under a second; with servers that do not answer at all, after `TIMEOUT`,
before a stub resolver's own 5 s timeout. No recursion, no cache: the upstream does that.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence

import trio

from agent.core import names
from agent.dns import wire
from agent.log import get_logger

log = get_logger("agent.dns.upstream")

TIMEOUT = 2.0  # seconds for one forwarded query, every server and the TCP retry included
RECHECK = 1.0  # seconds between two looks at resolv.conf's mtime
RESOLV_CONF = "/etc/resolv.conf"

Server = tuple[str, int]


class Upstreams:
    """The servers to forward to (see the module docstring)."""

    def __init__(self, fixed: Sequence[Server] = (), path: str = RESOLV_CONF) -> None:
        self.fixed = list(fixed)
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = -RECHECK
        self._read: list[Server] = []

    def servers(self) -> list[Server]:
        """The servers now: the fixed ones, or resolv.conf's (re-read when it changed)."""
        if self.fixed:
            return self.fixed
        now = time.monotonic()
        if now - self._checked >= RECHECK:
            self._checked = now
            self._reload()
        return self._read

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path) as f:
                text = f.read()
        except OSError as exc:
            if self._stamp != (0, 0):
                log.warning("dns.upstream.unreadable", path=self.path, error=str(exc))
            self._stamp, self._read = (0, 0), []
            return
        self._stamp = stamp
        self._read = [(s, 53) for s in names.parse_resolv_conf(text)]
        log.info("dns.upstream.loaded", path=self.path, servers=[s for s, _ in self._read])


async def forward(query: bytes, servers: Sequence[Server], *, tcp: bool) -> bytes | None:
    """The first answer of `servers` to `query` (over TCP at once if `tcp`); None if none
    answered in `TIMEOUT`."""
    deadline = trio.current_time() + TIMEOUT
    for i, server in enumerate(servers):
        share = (deadline - trio.current_time()) / (len(servers) - i)
        if share <= 0:
            break
        with trio.move_on_after(share):
            try:
                response = None if tcp else await _udp(query, server)
                if response is None or wire.is_truncated(response):
                    response = await _tcp(query, server)
                return response
            except OSError as exc:
                log.debug("dns.upstream.failed", server=server[0], port=server[1], error=str(exc))
    return None


async def _udp(query: bytes, server: Server) -> bytes:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)
        await sock.send(query)
        while True:
            response = await sock.recv(65535)
            if wire.same_id(query, response):
                return response


async def _tcp(query: bytes, server: Server) -> bytes:
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(struct.pack("!H", len(query)) + query)
        (size,) = struct.unpack("!H", await _read_exactly(stream, 2))
        response = await _read_exactly(stream, size)
    if not wire.same_id(query, response):
        raise OSError(f"answer from {server[0]} does not match the query")
    return response


async def _read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise OSError("connection closed early")
        data += chunk
    return bytes(data)
