"""What the kernel worker reads in bulk: one dump each, decoded into values.

Theory of operation: a dump (NLM_F_DUMP) answers with every object of a kind. Link and address
dumps are decoded by the event decoder (`agent.accel.nlevents`, Cython: ~0.3 us a message,
where pyroute2 takes ~120 us: 1.2 s for 10,000 links at start-up), after putting each payload
back into a netlink message; routes and namespace ids by `agent.kernel.rtnl`. These run at
start-up and on a resync, never on the attach path, in the worker's owner thread (they use its
socket).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

from agent import accel
from agent.core import naming
from agent.kernel import netns, rtnl, rtsocket
from agent.kernel.base import LinkInfo

_HDR = struct.Struct("=IHHII")
T = TypeVar("T")


def _dump(rt: rtsocket.RtSocket, request: rtnl.Request) -> list[bytes]:
    return rtsocket.check(rt.transact([request])[0])


def _as_messages(payloads: list[bytes], kind: int) -> bytes:
    """Dump payloads put back into netlink messages of type `kind`, for the event decoder."""
    return b"".join(
        _HDR.pack(16 + len(p), kind, 0, 0, 0) + p + b"\0" * (-len(p) % 4) for p in payloads
    )


def owned_links(rt: rtsocket.RtSocket) -> list[LinkInfo]:
    """The links of `rt`'s namespace in the agent's link group or with its alias, with their
    addresses: one link dump and one address dump. The group is set in the creating message,
    the alias by a second one, so a crash in between still leaves a link we recognise."""
    addresses: dict[int, list[str]] = {}
    for ev in accel.nlevents.decode(_as_messages(_dump(rt, rtnl.dump_addrs()), 20)):
        if ev.family in (socket.AF_INET, socket.AF_INET6):
            addresses.setdefault(ev.index, []).append(f"{ev.address}/{ev.prefixlen}")
    links = accel.nlevents.decode(
        _as_messages(_dump(rt, rtnl.dump_links()), 16), group=naming.LINK_GROUP
    )
    return [
        LinkInfo(
            index=ev.index,
            name=ev.name,
            kind=ev.kind,
            alias=ev.alias or "",
            master=ev.master,
            up=ev.up,
            addresses=tuple(addresses.get(ev.index, ())),
            group=ev.group,
        )
        for ev in links
    ]


def host_routes(rt: rtsocket.RtSocket) -> list[ipaddress.IPv4Network]:
    """Every non-default IPv4 route of the main table."""
    routes = []
    for payload in _dump(rt, rtnl.dump_routes()):
        found = rtsocket.route_dst(payload)
        if found is None or found[0] != rtnl.RT_TABLE_MAIN or found[1].endswith("/0"):
            continue
        routes.append(ipaddress.IPv4Network(found[1], strict=False))
    return routes


def link_names(rt: rtsocket.RtSocket) -> set[str]:
    """The names of every link of `rt`'s namespace."""
    return {rtsocket.Link(payload).name for payload in _dump(rt, rtnl.dump_links())}


def addresses_of(rt: rtsocket.RtSocket, name: str) -> list[str] | None:
    """The addresses ("address/prefix", both families) of link `name` in `rt`'s namespace;
    None when it has no such link (CNI's CHECK)."""
    links = map(rtsocket.Link, _dump(rt, rtnl.dump_links()))
    index = next((link.index for link in links if link.name == name), None)
    if index is None:
        return None
    msgs = _as_messages(_dump(rt, rtnl.dump_addrs()), 20)
    events = accel.nlevents.decode(msgs, indexes={index})
    return sorted(f"{ev.address}/{ev.prefixlen}" for ev in events if hasattr(ev, "prefixlen"))


def read_in(path: str, home: int, read: Callable[[rtsocket.RtSocket], T]) -> T:
    """`read` on a netlink socket opened inside the namespace at `path` (`home`: the
    caller's own namespace, to come back to; see `netns.socket_visiting`)."""
    fd = netns.open_netns(path)
    try:
        ns = rtsocket.RtSocket(netns.socket_visiting(fd, home))
    finally:
        os.close(fd)
    with contextlib.closing(ns):
        return read(ns)


def nsids(rt: rtsocket.RtSocket) -> list[int]:
    """The ids `rt`'s namespace gave to other namespaces."""
    ids = (rtsocket.nsid_of(payload) for payload in _dump(rt, rtnl.dump_nsids()))
    return [i for i in ids if i is not None]
