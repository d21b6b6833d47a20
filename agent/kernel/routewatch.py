"""The host's IPv4 routes as changes: one dump, then only what route notifications say.

Theory of operation. A chosen subnet must avoid the host's routes, and agentd used to dump
them all at every network create: with 1,000 networks, 1,000 connected routes (and twice as
many local ones) read and parsed for each create. `RouteWatch` dumps once, with a socket bound
to RTMGRP_IPV4_ROUTE opened first, and afterwards reads only the notifications queued since
the last call: the kernel queues a route's notification before the command that changed it
returns, so a route someone added just before a create is seen by that create. Routes are
kept by identity (table, destination, TOS, metric, output interface): a NEWROUTE for a route
already known (seen by the dump and then notified) changes nothing, a DELROUTE of an unknown
one neither, so the dump and the notifications may overlap. If the kernel dropped
notifications (ENOBUFS, the socket's buffer full) everything is dumped again.

`dump()` returns ("full", routes, []), `pending()` ("delta", added, removed) or raises `Lost`
(then dump again): non-default main-table IPv4 destinations as "a.b.c.d/len", one per route
identity that appeared or went, so the receiver can count them
(`agent.core.blocks.BlockSet`). This runs in agentd itself (`agent.kernel.client.Kernel`), not
in the kernel worker: reading a few queued notifications costs microseconds, a worker round
trip ~0.7 ms.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from agent.core.nlattrs import attrs, exact, u32
from agent.kernel import events

RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_TABLE = 1, 4, 6, 15
RT_TABLE_MAIN = 254
#: agentd's side of the kernel shell shares no module with the worker's (tests/shell/
#: test_jobs.py), so the two netlink headers this reads are spelled here
NLMSGHDR = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")

Key = tuple[str, int, int, int]  # (destination CIDR, TOS, metric, output interface)
Changes = tuple[str, list[str], list[str]]


def route_key(payload: bytes) -> Key | None:
    """The identity of a non-default main-table IPv4 route, or None for any other route.

    Raises:
        ValueError: the payload is malformed.
    """
    if len(payload) < RTMSG.size:
        raise ValueError(f"truncated rtmsg: {len(payload)} bytes")
    family, dst_len, _src, tos, table, *_ = RTMSG.unpack_from(payload, 0)
    if family != socket.AF_INET or dst_len == 0:
        return None
    dst, oif, metric = b"\0\0\0\0", 0, 0
    for kind, a, b in attrs(payload, RTMSG.size, len(payload)):
        if kind == RTA_DST:
            dst = exact(payload, a, b, 4)
        elif kind == RTA_TABLE:
            table = u32(payload, a, b)
        elif kind == RTA_OIF:
            oif = u32(payload, a, b)
        elif kind == RTA_PRIORITY:
            metric = u32(payload, a, b)
    if table != RT_TABLE_MAIN:
        return None
    return f"{socket.inet_ntoa(dst)}/{dst_len}", tos, metric, oif


class RouteWatch:
    """The routes of the namespace of the thread that first calls `changes` (see module)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._known: set[Key] = set()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        return events.open_netlink(socket.NETLINK_ROUTE, RTMGRP_IPV4_ROUTE)

    @property
    def watching(self) -> bool:
        """Whether a dump was made and notifications are followed since."""
        return self._sock is not None

    def dump(self) -> Changes:
        """("full", routes, []): the socket bound first, then one dump (blocking: a thread)."""
        self.close()
        self._sock = self._open()  # bound before the dump: no change after it is missed
        found = _dump_routes()
        self._known = {k for k in map(route_key, found) if k is not None}
        return "full", sorted(k[0] for k in self._known), []

    def pending(self) -> Changes:
        """("delta", added, removed): the notifications queued since the last call, read
        without blocking.

        Raises:
            Lost: the kernel dropped notifications (or nothing was dumped yet): `dump` again.
        """
        if self._sock is None:
            raise Lost("no dump yet")
        added: list[str] = []
        removed: list[str] = []
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return "delta", added, removed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                raise Lost("route notifications were lost") from exc
            for kind, payload in _messages(data):
                key = route_key(payload) if kind in (RTM_NEWROUTE, RTM_DELROUTE) else None
                if key is not None and kind == RTM_NEWROUTE and key not in self._known:
                    self._known.add(key)
                    added.append(key[0])
                elif key is not None and kind == RTM_DELROUTE and key in self._known:
                    self._known.remove(key)
                    removed.append(key[0])


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram."""
    out = []
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, kind = NLMSGHDR.unpack_from(data, off)[:2]
        if length < NLMSGHDR.size:
            break
        out.append((kind, data[off + NLMSGHDR.size : off + length]))
        off += (length + 3) & ~3
    return out


def _dump_routes() -> list[bytes]:
    """The payloads of an RTM_GETROUTE dump (IPv4, every table) of this namespace.

    Raises:
        OSError: the kernel answered the dump with an error.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:  # fmt: skip
        sock.bind((0, 0))
        body = RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        flags = NLM_F_REQUEST | NLM_F_DUMP
        sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETROUTE, flags, 1, 0) + body)
        found: list[bytes] = []
        while True:
            for kind, payload in _messages(sock.recv(1 << 20)):
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise OSError(err, f"route dump: {os.strerror(err)}")
                elif kind == RTM_NEWROUTE:
                    found.append(payload)


class Lost(Exception):
    """Route notifications were lost (or never followed): a dump is needed."""
