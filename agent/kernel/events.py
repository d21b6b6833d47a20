"""Kernel event sources: rtnetlink link/address notifications, read without ever blocking.

Theory of operation: a raw NETLINK_ROUTE socket bound to RTMGRP_LINK | RTMGRP_IPV4_IFADDR |
RTMGRP_IPV6_IFADDR in the daemon's namespace receives every link and address change as it
happens (no polling). A namespace's deletion destroys the veth end inside it and therefore its
peer, so the host end's RTM_DELLINK arrives here too: NETLINK_LISTEN_ALL_NSID is not needed.

The reader must never block: while it waits, the kernel keeps queueing notifications and, once
the socket buffer is full, drops them and reports ENOBUFS on the next `recv`. So the reader
drains the socket until EAGAIN at every wake-up, decodes each datagram with the `_fast` decoder
(`agent.accel.nlevents`), and hands events to the channel with `send_nowait`. When the channel
is full it drops events and owes the consumer one `Overflow`; the same happens on ENOBUFS and
on a datagram that does not decode. The `Overflow` is delivered as soon as the channel has room
(a helper task waits for it), so the consumer sees `Overflow` after everything it missed and
resyncs with a full dump (`Outbox` states the exact guarantee).

`Outbox` and `pump` are shared with `agent/firewall/monitor.py`, the nftables source.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Container, Iterable
from typing import Any, NoReturn

import structlog
import trio

from agent.accel import nlevents
from agent.core.nlevents import Overflow
from agent.kernel import repair_filter

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
SO_RCVBUFFORCE = 33  # socket.SO_RCVBUFFORCE is missing from some Python builds
RCVBUF = 4 << 20
RECV_SIZE = 1 << 16  # one datagram: the kernel's notifications are under NLMSG_GOODSIZE

log = structlog.get_logger("agent.kernel.events")


class Outbox:
    """Puts values on a memory channel without ever waiting; owes an `Overflow` after a loss.

    Guarantee: every value dropped is followed, in channel order, by an `Overflow` that the
    consumer reads after the drop (so resyncing when it reads one misses nothing), and at most
    one `Overflow` is pending at a time. When `send_nowait` fails, the value is dropped and an
    `Overflow` is owed; a helper task blocks in `send` until there is room. Values keep being
    offered meanwhile: trio fills freed room from blocked senders first, so a value that goes
    in while the helper is blocked lands behind its `Overflow` (delivered); one that goes in
    before the helper started simply precedes it. A drop after the helper's `send` handed the
    `Overflow` over but before the helper resumed (seen in the channel's statistics) owes a new
    one. tests/shell/test_events.py checks this on random interleavings. The reasoning needs
    the channel to have no other sender: give each source its own channel, not clones of one.

    Resource handling: the helper task that delivers a pending `Overflow` runs in `nursery`.
    """

    def __init__(self, send: trio.MemorySendChannel[Any], nursery: trio.Nursery, source: str):
        self._send = send
        self._nursery = nursery
        self.source = source
        self._pending: Overflow | None = None  # owed, not known to be in the channel yet
        self._blocked: Overflow | None = None  # the one a helper is inside `send` with
        self.dropped = 0

    def put(self, value: Any) -> None:
        """Send `value` now, or drop it (and owe an `Overflow`) when the channel is full."""
        try:
            self._send.send_nowait(value)
        except trio.WouldBlock:
            self.dropped += 1
            if self._pending is not None and self._taken():
                self._delivered(self._pending)  # already in: this loss needs a new one
            self.lost("channel")
        else:
            if self._pending is not None and self._blocked is self._pending:  # it went in first
                self._delivered(self._pending)

    def _taken(self) -> bool:
        """True when the helper's `send` has handed its `Overflow` over (helper not resumed)."""
        blocked = self._blocked is self._pending
        return blocked and self._send.statistics().tasks_waiting_send == 0

    def lost(self, reason: str) -> None:
        """Events were lost (`reason`: kernel, channel or garbage): deliver one `Overflow`."""
        if self._pending is not None:
            return
        overflow = Overflow(self.source, reason)
        try:
            self._send.send_nowait(overflow)
        except trio.WouldBlock:
            self._pending = overflow
            self._nursery.start_soon(self._deliver, overflow)
        else:
            self._delivered(overflow)

    async def _deliver(self, overflow: Overflow) -> None:
        self._blocked = overflow
        try:
            await self._send.send(overflow)
        finally:
            if self._blocked is overflow:
                self._blocked = None
        if self._pending is overflow:
            self._delivered(overflow)

    def _delivered(self, overflow: Overflow) -> None:
        log.warning(
            "events.overflow", source=self.source, reason=overflow.reason, dropped=self.dropped
        )
        self._pending = None
        self.dropped = 0


def open_netlink(protocol: int, groups: int) -> socket.socket:
    """A non-blocking netlink socket bound to multicast `groups`, with a large receive buffer."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol
    )
    try:
        try:  # root may exceed net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


async def pump(
    sock: socket.socket,
    outbox: Outbox,
    handle: Callable[[memoryview], Iterable[Any]],
    *,
    on_loss: Callable[[], None] | None = None,
) -> NoReturn:
    """Forever: wait until readable, drain the socket to EAGAIN, put what `handle` returns.

    Error handling: ENOBUFS (the kernel dropped notifications) and a `ValueError` from `handle`
    call `on_loss` (a stateful decoder forgets its partial state) and become an `Overflow`;
    any other socket error propagates.
    """
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    while True:
        await trio.lowlevel.wait_readable(sock)
        while True:
            try:
                size = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                if on_loss is not None:
                    on_loss()
                outbox.lost("kernel")
                continue
            try:
                values = handle(view[:size])
            except ValueError as exc:
                log.warning("events.undecodable", source=outbox.source, error=str(exc))
                if on_loss is not None:
                    on_loss()
                outbox.lost("garbage")
                continue
            for value in values:
                outbox.put(value)


async def serve_link_events(
    send: trio.MemorySendChannel[Any],
    *,
    group: int | None = None,
    indexes: Container[int] | None = None,
    repairs_only: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send every link and address event of this namespace to `send`, until cancelled.

    Values sent: `LinkEvent`, `AddrEvent` and `Overflow(source="link")` (resync: events were
    lost). `group` and `indexes` filter in the decoder (see `agent.core.nlevents`); `indexes`
    is read at each datagram, so the caller may keep updating the set it passed.
    `repairs_only` filters in the kernel, before any wake-up: no link going up, no new address,
    nothing of the dying group (`agent.kernel.repair_filter`; if the kernel refuses the filter,
    a warning, and everything comes through as without it).

    Reports started once the socket is bound: no change after that point is missed (or its
    loss is reported by an `Overflow`). The channel is not closed on exit.
    """
    groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
    decode = nlevents.decode
    with open_netlink(NETLINK_ROUTE, groups) as sock:
        if repairs_only:
            repair_filter.attach(sock)
        async with trio.open_nursery() as nursery:
            outbox = Outbox(send, nursery, "link")
            task_status.started()
            await pump(sock, outbox, lambda data: decode(data, group, indexes))
