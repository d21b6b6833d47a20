"""Decode rtnetlink link and address notifications: pure twin of `_fast/nlevents.pyx`.

Theory of operation: the event reader (`agent/kernel/events.py`) hands `decode` each datagram
it receives from a NETLINK_ROUTE socket bound to the link and address groups. A datagram holds
one or more netlink messages; `decode` turns the RTM_NEWLINK / RTM_DELLINK / RTM_NEWADDR /
RTM_DELADDR ones into small frozen values and skips every other type. Both twins give identical
results, errors included (tests/core/test_nlevents.py checks it on captured and mutated input).

Hot path: most notifications on a busy host are about links the agent does not own (other
tools' veths, its own veth peers moving, statistics-only changes). Pass the filter arguments
and such messages cost one walk over their attributes, no string is decoded and no value built:

- a link event is kept when its IFLA_GROUP equals `group`, its alias starts with
  `naming.ALIAS_PREFIX`, or its ifindex is in `indexes` (e.g. adopted user bridges);
- an address event is kept when its ifindex is in `indexes` (the bridges' ifindexes), or
  always when `indexes` is None.

`indexes` is consulted at every call, so the caller may share one set and update it as bridges
come and go. With neither argument, every link and address message is decoded.

Errors: malformed input (a truncated header, an attribute that overruns its message, a body too
short for its fixed header, an address of the wrong length) raises `ValueError` and nothing
else. Message and attribute lengths are checked before any field is read (attributes are
walked by `agent.core.nlattrs`, the one walker). The nested IFLA_LINKINFO is only walked for
kept links.

Only `ifi_family == AF_UNSPEC` link messages describe a link: the bridge also sends
RTM_NEWLINK/RTM_DELLINK with AF_BRIDGE for port changes (`br_ifinfo_notify`), and an
RTM_DELLINK of that kind means "left the bridge", not "deleted". They are skipped.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Container

import msgspec

from agent.core.naming import ALIAS_PREFIX
from agent.core.nlattrs import attrs, cstr, u32

NLMSG_HDRLEN = 16
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
AF_UNSPEC, AF_INET, AF_INET6 = 0, 2, 10
IFF_UP = 0x1
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_GROUP = 3, 10, 18, 20, 27
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2

IFINFOMSG_LEN = 16
IFADDRMSG_LEN = 8
ALIAS_PREFIX_BYTES = ALIAS_PREFIX.encode()

_HDR = struct.Struct("=IH")  # nlmsg_len, nlmsg_type (flags, seq, pid are not needed)
_IFINFO = struct.Struct("=BxHiI")  # family, type, index, flags
_IFADDR = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_ADDR_LEN = {AF_INET: 4, AF_INET6: 16}


class LinkEvent(msgspec.Struct, frozen=True, gc=False):
    """A link appeared, changed (`"new"`) or was deleted (`"del"`)."""

    action: str
    index: int
    name: str
    kind: str | None
    alias: str | None
    master: int
    up: bool
    group: int


class AddrEvent(msgspec.Struct, frozen=True, gc=False):
    """An address was added (`"new"`) to or removed (`"del"`) from link `index`."""

    action: str
    index: int
    family: int
    address: str
    prefixlen: int


class Overflow(msgspec.Struct, frozen=True, gc=False):
    """Events were lost: resynchronise with a full dump. Emitted by the readers, not `decode`.

    `source` is `"link"` (rtnetlink) or `"nft"` (nftables); `reason` is `"kernel"` (ENOBUFS:
    the socket buffer overflowed), `"channel"` (the consumer was too slow) or `"garbage"`
    (a datagram that would not decode).
    """

    source: str
    reason: str


Event = LinkEvent | AddrEvent


def decode(
    buf: bytes | bytearray | memoryview,
    group: int | None = None,
    indexes: Container[int] | None = None,
) -> list[Event]:
    """The link and address events in one datagram, filtered as the module docstring says.

    Raises:
        ValueError: the datagram is malformed.
    """
    view = memoryview(buf)
    end = len(view)
    filtered = group is not None or indexes is not None
    events: list[Event] = []
    pos = 0
    while pos < end:
        if end - pos < NLMSG_HDRLEN:
            raise ValueError(f"truncated netlink header at offset {pos}")
        size, kind = _HDR.unpack_from(view, pos)
        if size < NLMSG_HDRLEN or size > end - pos:
            raise ValueError(f"bad netlink message length {size} at offset {pos}")
        body = pos + NLMSG_HDRLEN
        event: Event | None
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            event = _link(view, body, pos + size, kind, filtered, group, indexes)
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            event = _addr(view, body, pos + size, kind, indexes)
        else:
            event = None
        if event is not None:
            events.append(event)
        pos += (size + 3) & ~3
    return events


def _link(
    view: memoryview,
    start: int,
    end: int,
    kind: int,
    filtered: bool,
    group: int | None,
    indexes: Container[int] | None,
) -> LinkEvent | None:
    if end - start < IFINFOMSG_LEN:
        raise ValueError(f"truncated ifinfomsg at offset {start}")
    family, _type, index, flags = _IFINFO.unpack_from(view, start)
    if family != AF_UNSPEC:
        return None
    name = alias = info = master = None
    link_group = 0
    for akind, a, b in attrs(view, start + IFINFOMSG_LEN, end):
        if akind == IFLA_IFNAME:
            name = (a, b)
        elif akind == IFLA_IFALIAS:
            alias = (a, b)
        elif akind == IFLA_MASTER:
            master = u32(view, a, b)
        elif akind == IFLA_GROUP:
            link_group = u32(view, a, b)
        elif akind == IFLA_LINKINFO:
            info = (a, b)
    if filtered and not (
        (group is not None and link_group == group)
        or (
            alias is not None and view[alias[0] : alias[1]].tobytes().startswith(ALIAS_PREFIX_BYTES)
        )
        or (indexes is not None and index in indexes)
    ):
        return None
    link_kind = None
    if info is not None:
        for ikind, a, b in attrs(view, *info):
            if ikind == IFLA_INFO_KIND:
                link_kind = cstr(view, a, b)
    return LinkEvent(
        "new" if kind == RTM_NEWLINK else "del",
        index,
        "" if name is None else cstr(view, *name),
        link_kind,
        None if alias is None else cstr(view, *alias),
        master or 0,
        bool(flags & IFF_UP),
        link_group,
    )


def _addr(
    view: memoryview, start: int, end: int, kind: int, indexes: Container[int] | None
) -> AddrEvent | None:
    if end - start < IFADDRMSG_LEN:
        raise ValueError(f"truncated ifaddrmsg at offset {start}")
    family, prefixlen, _flags, _scope, index = _IFADDR.unpack_from(view, start)
    want = _ADDR_LEN.get(family)
    if want is None or (indexes is not None and index not in indexes):
        return None
    local = address = None
    for akind, a, b in attrs(view, start + IFADDRMSG_LEN, end):
        if akind == IFA_LOCAL:
            local = (a, b)
        elif akind == IFA_ADDRESS:
            address = (a, b)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point
    # links (and the only one IPv6 sends).
    found = local or address
    if found is None or found[1] - found[0] != want:
        raise ValueError(f"address message without a {want}-byte address at offset {start}")
    packed = view[found[0] : found[1]].tobytes()
    text = str(ipaddress.IPv4Address(packed) if want == 4 else ipaddress.IPv6Address(packed))
    return AddrEvent("new" if kind == RTM_NEWADDR else "del", index, family, text, prefixlen)
