"""The rtnetlink socket and what comes back on it: acks, errors, the replies the shell reads.

Theory of operation: `RtSocket.transact` sends several requests (`agent.kernel.rtnl`) in ONE
datagram; the kernel (`netlink_rcv_skb`) processes them in order and answers each one, which
saves a round trip per step. Errors come back as `NetlinkError` with the errno and the
kernel's extended-ack message when it gives one. Replies are read by `Link`, `nsid_of` and
`route_dst` (dumps: by the event decoder, `agent.accel.nlevents`), their attributes walked by
`agent.core.nlattrs`: a payload too short for its fixed header, or an attribute that does not
fit, raises `ValueError`. What is read here is checked against pyroute2 as an independent
oracle (tests/shell/test_rtnl.py).

Only the owner thread (or a short-lived namespace thread) uses an `RtSocket`: it is blocking
and not thread-safe.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

from agent.core.errors import AgentError, Conflict, KernelError, NotFound
from agent.core.nlattrs import attrs, cstr, exact, s32, u32
from agent.kernel.rtnl import (  # the headers and flags of the requests
    IFINFOMSG,
    IFLA_GROUP,
    IFLA_IFALIAS,
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINK,
    IFLA_LINKINFO,
    IFLA_MASTER,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_ROUTE,
    NETNSA_NSID,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    NLMSGHDR,
    RTA_DST,
    RTA_OIF,
    RTA_TABLE,
    RTGENMSG,
    RTMSG,
    SOL_NETLINK,
    Request,
)

_ERR = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused a request: `errno` plus the extended-ack text when there is one."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.detail = message


def _fixed(header: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    """The fixed header at the start of a reply payload; ValueError if it is cut short."""
    if len(payload) < header.size:
        raise ValueError(f"truncated {what}: {len(payload)} bytes")
    return header.unpack_from(payload, 0)


def nsid_of(payload: bytes) -> int | None:
    """The NETNSA_NSID of one RTM_NEWNSID message.

    Raises:
        ValueError: the payload is malformed.
    """
    _fixed(RTGENMSG, payload, "rtgenmsg")
    for kind, a, b in attrs(payload, RTGENMSG.size, len(payload)):
        if kind == NETNSA_NSID:
            return s32(payload, a, b)
    return None


def route_dst(payload: bytes) -> tuple[int, str, int] | None:
    """(table, destination CIDR, oif) of an IPv4 RTM_NEWROUTE payload; None if not IPv4.

    Raises:
        ValueError: the payload is malformed.
    """
    family, dst_len, _src, _tos, table, _p, _s, _t, _f = _fixed(RTMSG, payload, "rtmsg")
    if family != socket.AF_INET:
        return None
    dst, oif = b"\0\0\0\0", 0
    for kind, a, b in attrs(payload, RTMSG.size, len(payload)):
        if kind == RTA_DST:
            dst = exact(payload, a, b, 4)
        elif kind == RTA_TABLE:
            table = u32(payload, a, b)
        elif kind == RTA_OIF:
            oif = u32(payload, a, b)
    return table, f"{socket.inet_ntoa(dst)}/{dst_len}", oif


# --- replies --------------------------------------------------------------------------------


class Link:
    """The few fields of an RTM_NEWLINK reply that the shell needs.

    Raises:
        ValueError: the payload is malformed.
    """

    __slots__ = ("alias", "flags", "group", "index", "kind", "link", "master", "name")

    def __init__(self, payload: bytes) -> None:
        _family, _type, self.index, self.flags, _change = _fixed(IFINFOMSG, payload, "ifinfomsg")
        self.name = ""
        self.kind: str | None = None
        self.alias: str | None = None
        self.master = 0
        self.group = 0
        self.link = 0  # a veth's peer ifindex (in the peer's namespace)
        for kind, a, b in attrs(payload, IFINFOMSG.size, len(payload)):
            if kind == IFLA_IFNAME:
                self.name = cstr(payload, a, b)
            elif kind == IFLA_LINK:
                self.link = u32(payload, a, b)
            elif kind == IFLA_IFALIAS:
                self.alias = cstr(payload, a, b)
            elif kind == IFLA_MASTER:
                self.master = u32(payload, a, b)
            elif kind == IFLA_GROUP:
                self.group = u32(payload, a, b)
            elif kind == IFLA_LINKINFO:
                for sub, c, d in attrs(payload, a, b):
                    if sub == IFLA_INFO_KIND:
                        self.kind = cstr(payload, c, d)


class RtSocket:
    """A blocking NETLINK_ROUTE socket bound to the namespace it was created in."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock = sock
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.bind((0, 0))
        except OSError:
            sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def transact(self, requests: list[Request]) -> list[list[bytes] | NetlinkError]:
        """Send `requests` in one datagram; per request, its reply payloads or its error.

        Replies of a non-dump request end with its ACK (requests carry NLM_F_ACK) or, for a
        plain GET, with its single reply; a dump ends with NLMSG_DONE.
        """
        first = self._seq + 1
        chunks = []
        for offset, (kind, flags, body) in enumerate(requests):
            chunks.append(
                NLMSGHDR.pack(16 + len(body), kind, NLM_F_REQUEST | flags, first + offset, 0)
            )
            chunks.append(body)
        self._seq += len(requests)
        self.sock.send(b"".join(chunks))
        results: list[list[bytes] | NetlinkError | None] = [None] * len(requests)
        partial: list[list[bytes]] = [[] for _ in requests]
        pending = len(requests)
        while pending:
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(data):
                size, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
                slot = seq - first
                if size < 16 or not 0 <= slot < len(requests) or results[slot] is not None:
                    pos += max((size + 3) & ~3, 16)
                    continue
                payload = data[pos + 16 : pos + size]
                done = True
                if kind == NLMSG_ERROR:
                    err = _ERR.unpack_from(payload)[0]
                    outcome = partial[slot] if err == 0 else _error(-err, flags, payload)
                elif kind == NLMSG_DONE:
                    outcome = partial[slot]
                else:
                    partial[slot].append(payload)
                    outcome = partial[slot]
                    done = not requests[slot][1] & (NLM_F_ACK | NLM_F_DUMP)
                if done:
                    results[slot] = outcome
                    pending -= 1
                pos += (size + 3) & ~3
        return results  # type: ignore[return-value]


def _error(err: int, flags: int, payload: bytes) -> NetlinkError:
    message = ""
    if flags & NLM_F_ACK_TLVS:
        # nlmsgerr: error (4) + the request's header (16; the body is capped by CAP_ACK)
        for kind, a, b in attrs(payload, 20, len(payload)):
            if kind == NLMSGERR_ATTR_MSG:
                message = cstr(payload, a, b)
    return NetlinkError(err, message)


def map_error(exc: NetlinkError, what: str, **data: Any) -> AgentError:
    """The one mapping of netlink errors: EEXIST -> Conflict, ENODEV -> NotFound, anything
    else -> KernelError; `what` says what was being done."""
    text = f"{what}: {exc.strerror}"
    if exc.errno == errno.EEXIST:
        return Conflict(text, errno=exc.errno, **data)
    if exc.errno == errno.ENODEV:
        return NotFound(text, errno=exc.errno, **data)
    return KernelError(text, errno=exc.errno, **data)


def step(result: list[bytes] | NetlinkError, what: str, data: dict[str, Any]) -> list[bytes]:
    """The replies of one step, or its error mapped with a message naming the step."""
    if isinstance(result, NetlinkError):
        raise map_error(result, f"cannot {what}", **data) from result
    return result


def check(result: list[bytes] | NetlinkError) -> list[bytes]:
    """The replies of one request, or raise its error."""
    if isinstance(result, NetlinkError):
        raise result
    return result
