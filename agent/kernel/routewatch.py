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

`changes()` returns ("full", routes) the first time and after a loss, else ("delta", added,
removed): non-default main-table IPv4 destinations as "a.b.c.d/len", one per route identity
that appeared or went, so the receiver can count them (`agent.core.blocks.BlockSet`).
"""

from __future__ import annotations

import errno
import socket

from agent.core.nlattrs import attrs, exact, u32
from agent.kernel import rtnl, rtsocket

RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_PRIORITY = 6
_RCVBUF = 4 << 20
SO_RCVBUFFORCE = 33

Key = tuple[str, int, int, int]  # (destination CIDR, TOS, metric, output interface)
Changes = tuple[str, list[str], list[str]]


def route_key(payload: bytes) -> Key | None:
    """The identity of a non-default main-table IPv4 route, or None for any other route.

    Raises:
        ValueError: the payload is malformed.
    """
    if len(payload) < rtnl.RTMSG.size:
        raise ValueError(f"truncated rtmsg: {len(payload)} bytes")
    family, dst_len, _src, tos, table, *_ = rtnl.RTMSG.unpack_from(payload, 0)
    if family != socket.AF_INET or dst_len == 0:
        return None
    dst, oif, metric = b"\0\0\0\0", 0, 0
    for kind, a, b in attrs(payload, rtnl.RTMSG.size, len(payload)):
        if kind == rtnl.RTA_DST:
            dst = exact(payload, a, b, 4)
        elif kind == rtnl.RTA_TABLE:
            table = u32(payload, a, b)
        elif kind == rtnl.RTA_OIF:
            oif = u32(payload, a, b)
        elif kind == RTA_PRIORITY:
            metric = u32(payload, a, b)
    if table != rtnl.RT_TABLE_MAIN:
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
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        try:
            try:  # root may exceed net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, RTMGRP_IPV4_ROUTE))
        except BaseException:
            sock.close()
            raise
        return sock

    def _full(self, rt: rtsocket.RtSocket) -> Changes:
        self.close()
        self._sock = self._open()  # bound before the dump: no change after it is missed
        found = rtsocket.check(rt.transact([rtnl.dump_routes()])[0])
        self._known = {k for k in map(route_key, found) if k is not None}
        return "full", sorted(k[0] for k in self._known), []

    def changes(self, rt: rtsocket.RtSocket) -> Changes:
        """What changed since the last call (see the module); `rt` dumps when needed."""
        if self._sock is None:
            return self._full(rt)
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
                return self._full(rt)  # notifications were lost: start again from a dump
            off = 0
            while off + 16 <= len(data):
                length, kind = rtnl.NLMSGHDR.unpack_from(data, off)[:2]
                if length < 16:
                    break
                if kind in (RTM_NEWROUTE, RTM_DELROUTE):
                    key = route_key(data[off + 16 : off + length])
                    if key is not None and kind == RTM_NEWROUTE and key not in self._known:
                        self._known.add(key)
                        added.append(key[0])
                    elif key is not None and kind == RTM_DELROUTE and key in self._known:
                        self._known.remove(key)
                        removed.append(key[0])
                off += (length + 3) & ~3
