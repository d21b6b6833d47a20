"""Lean rtnetlink: the few messages of the hot path, packed with `struct`, on a raw socket.

Theory of operation: pyroute2 spends most of an attach encoding and parsing messages (DESIGN
section 4: 3.8 ms of a 5.9 ms attach, against ~2 ms of kernel work). The hot path needs only a
handful of fixed-shape requests, so they are packed here directly. Several requests can travel
in ONE datagram: the kernel (`netlink_rcv_skb`) processes them in order and answers each one,
which saves a round trip per step. Errors come back as `NetlinkError` with the errno and the
kernel's extended-ack message when it gives one.

Replies are read by `Link`, `nsid_of` and `route_dst` (dumps: by the event decoder,
`agent.accel.nlevents`), their attributes walked by `agent.core.nlattrs`: a payload too short
for its fixed header, or an attribute that does not fit, raises `ValueError`. What is encoded
here and what is read are both checked against pyroute2 as an independent oracle
(tests/shell/test_rtnl.py).

Only the owner thread (or a short-lived namespace thread) uses an `RtSocket`: it is blocking
and not thread-safe.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from agent.core.nlattrs import attrs, cstr, exact, s32, u32

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15

IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_GROUP, IFLA_NET_NS_FD = 18, 20, 27, 28
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_GATEWAY = 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
LOOPBACK_IFINDEX = 1  # the kernel gives lo index 1 in every network namespace

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_ERR = struct.Struct("=i")

Request = tuple[int, int, bytes]
"""(message type, extra flags, body after the netlink header)."""


class NetlinkError(OSError):
    """The kernel refused a request: `errno` plus the extended-ack text when there is one."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.detail = message


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = 4 + len(payload)
    return _RTA.pack(size, kind) + payload + b"\0" * (-size % 4)


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def ifinfo(index: int = 0, *, up: bool = False) -> bytes:
    """An `ifinfomsg`; `up=True` sets IFF_UP in both flags and change mask."""
    flag = IFF_UP if up else 0
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flag, flag)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


# --- requests -------------------------------------------------------------------------------


def get_link(name: str) -> Request:
    return RTM_GETLINK, 0, ifinfo() + attr_str(IFLA_IFNAME, name)


IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS = 29, 1 << 3


def dump_links() -> Request:
    """All links, without their statistics (a third of each message, of no use here)."""
    return RTM_GETLINK, NLM_F_DUMP, ifinfo() + attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)


def set_up(index: int = 0, name: str | None = None) -> Request:
    body = ifinfo(index, up=True)
    if name is not None:
        body += attr_str(IFLA_IFNAME, name)
    return RTM_NEWLINK, NLM_F_ACK, body


IFLA_AF_SPEC, IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 26, 8, 1


def set_no_ipv6_addresses(index: int) -> Request:
    """No IPv6 address generation on link `index` (IN6_ADDR_GEN_MODE_NONE), sent while it is
    down: without a link-local address it sends no DAD, router or MLD solicitation.
    EAFNOSUPPORT when the link has no IPv6 (none in the kernel, or an MTU below 1280)."""
    mode = attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
    body = ifinfo(index) + attr(IFLA_AF_SPEC, attr(socket.AF_INET6, mode))
    return RTM_NEWLINK, NLM_F_ACK, body


def set_master_up(name: str, master: int) -> Request:
    """Enslave link `name` to the bridge with ifindex `master` and set it up."""
    body = ifinfo(up=True) + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MASTER, master)
    return RTM_NEWLINK, NLM_F_ACK, body


IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA, IFLA_BRPORT_MODE = 4, 5, 4


def set_alias(name: str, alias: str, *, hairpin: bool = False, up: bool = False) -> Request:
    """Set the alias; with `hairpin`, also the bridge port's hairpin mode, with `up` bring the
    link up (one message).

    Hairpin mode lets a frame leave by the port it came in: needed when a container reaches
    its own published port, DNATed back to itself by br_netfilter (Docker sets it too when
    its userland proxy is off).
    """
    body = ifinfo(up=up) + attr_str(IFLA_IFNAME, name) + attr_str(IFLA_IFALIAS, alias)
    return RTM_NEWLINK, NLM_F_ACK, body + (_HAIRPIN if hairpin else b"")


_HAIRPIN = attr(
    IFLA_LINKINFO,
    attr_str(IFLA_INFO_SLAVE_KIND, "bridge")
    + attr(IFLA_INFO_SLAVE_DATA, attr(IFLA_BRPORT_MODE, b"\x01")),
)


def set_hairpin(name: str) -> Request:
    """Hairpin mode on bridge port `name` (see `set_alias`)."""
    return RTM_NEWLINK, NLM_F_ACK, ifinfo() + attr_str(IFLA_IFNAME, name) + _HAIRPIN


def retire(name: str, group: int) -> Request:
    """Cut a link off at once: down, out of its bridge (IFLA_MASTER 0), into link group `group`
    (deleted later in one batch by `del_group`: one RCU wait for many links)."""
    head = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, IFF_UP)  # flags 0 under change mask IFF_UP
    body = head + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MASTER, 0)
    return RTM_NEWLINK, NLM_F_ACK, body + attr_u32(IFLA_GROUP, group)


def set_group(name: str, group: int) -> Request:
    """Only move a link into link group `group` (no RCU wait, unlike setting it down)."""
    return (
        RTM_NEWLINK,
        NLM_F_ACK,
        ifinfo() + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_GROUP, group),
    )


def del_group(group: int) -> Request:
    """Delete every link of link group `group` (ENODEV when there is none)."""
    return RTM_DELLINK, NLM_F_ACK, ifinfo() + attr_u32(IFLA_GROUP, group)


_RTGEN = struct.Struct("Bxxx")  # rtgenmsg, padded to 4


def new_nsid(netns_fd: int, nsid: int) -> Request:
    """Give namespace `netns_fd` the id `nsid` in this namespace (EEXIST: it has one, or the id
    is taken)."""
    body = _RTGEN.pack(socket.AF_UNSPEC) + attr_u32(NETNSA_FD, netns_fd)
    return RTM_NEWNSID, NLM_F_ACK, body + attr(NETNSA_NSID, struct.pack("i", nsid))


def dump_nsids() -> Request:
    return RTM_GETNSID, NLM_F_DUMP, _RTGEN.pack(socket.AF_UNSPEC)


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
    _fixed(_RTGEN, payload, "rtgenmsg")
    for kind, a, b in attrs(payload, _RTGEN.size, len(payload)):
        if kind == NETNSA_NSID:
            return s32(payload, a, b)
    return None


def dump_addrs() -> Request:
    """Every address of the namespace, IPv4 and IPv6."""
    return RTM_GETADDR, NLM_F_DUMP, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)


def dump_routes() -> Request:
    return RTM_GETROUTE, NLM_F_DUMP, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)


def route_dst(payload: bytes) -> tuple[int, str, int] | None:
    """(table, destination CIDR, oif) of an IPv4 RTM_NEWROUTE payload; None if not IPv4.

    Raises:
        ValueError: the payload is malformed.
    """
    family, dst_len, _src, _tos, table, _p, _s, _t, _f = _fixed(_RTMSG, payload, "rtmsg")
    if family != socket.AF_INET:
        return None
    dst, oif = b"\0\0\0\0", 0
    for kind, a, b in attrs(payload, _RTMSG.size, len(payload)):
        if kind == RTA_DST:
            dst = exact(payload, a, b, 4)
        elif kind == RTA_TABLE:
            table = u32(payload, a, b)
        elif kind == RTA_OIF:
            oif = u32(payload, a, b)
    return table, f"{socket.inet_ntoa(dst)}/{dst_len}", oif


def del_link(name: str) -> Request:
    return RTM_DELLINK, NLM_F_ACK, ifinfo() + attr_str(IFLA_IFNAME, name)


def new_bridge(name: str, mtu: int, group: int) -> Request:
    linkinfo = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge"))
    body = ifinfo() + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MTU, mtu)
    body += attr_u32(IFLA_GROUP, group) + linkinfo
    return RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


_ONE_QUEUE = attr_u32(IFLA_NUM_TX_QUEUES, 1) + attr_u32(IFLA_NUM_RX_QUEUES, 1)


def new_veth(
    *, name: str, master: int, group: int, mtu: int, peer: str, peer_mac: str, netns_fd: int
) -> Request:
    """The host end is enslaved (and down) at creation; the peer is born in the namespace.

    The host end stays down until `set_alias(..., up=True)`, so that IPv6 can be disabled on
    it before it comes up (see `ops.Ops.attach`); the peer cannot be brought up in
    this message either (ENOTCONN: `veth_open` runs before the pair is linked).
    IFLA_MASTER in a create enslaves after registering and unregisters the pair if that fails.
    IFLA_IFALIAS is ignored at creation (measured): it needs its own message.

    Both ends are made with one TX and one RX queue, which is what the kernel leaves in use
    anyway: without the attributes a veth gets one queue per possible CPU, and `veth_newlink`
    then cuts the real number to one on the registered device, which waits for an RCU grace
    period (synchronize_net), once per end (measured: attach 1.09 -> 0.89 ms).

    NLM_F_ECHO: the kernel also sends us the host end's creation notification, which it builds
    anyway; its IFLA_LINK is the peer's ifindex inside the namespace (`Link.link`), so the
    namespace side needs no lookup.
    """
    peer_body = ifinfo() + attr_str(IFLA_IFNAME, peer)
    peer_body += attr(IFLA_ADDRESS, mac_bytes(peer_mac))
    peer_body += attr_u32(IFLA_MTU, mtu) + attr_u32(IFLA_NET_NS_FD, netns_fd) + _ONE_QUEUE
    data = attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_body))
    linkinfo = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth") + data)
    body = ifinfo() + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MTU, mtu) + _ONE_QUEUE
    body += attr_u32(IFLA_MASTER, master) + attr_u32(IFLA_GROUP, group) + linkinfo
    return RTM_NEWLINK, NLM_F_ACK | NLM_F_ECHO | NLM_F_CREATE | NLM_F_EXCL, body


def new_addr(index: int, cidr: str) -> Request:
    """IPv4 address with broadcast (as Docker's netlink library sets it for prefixes < 31)."""
    iface = ipaddress.IPv4Interface(cidr)
    packed = iface.ip.packed
    body = _IFADDR.pack(socket.AF_INET, iface.network.prefixlen, 0, 0, index)
    body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
    if iface.network.prefixlen < 31:
        body += attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
    return RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def del_addr(index: int, cidr: str) -> Request:
    """Remove the IPv4 address `cidr` from link `index`."""
    iface = ipaddress.IPv4Interface(cidr)
    body = _IFADDR.pack(socket.AF_INET, iface.network.prefixlen, 0, 0, index)
    return RTM_DELADDR, NLM_F_ACK, body + attr(IFA_LOCAL, iface.ip.packed)


IFA_FLAGS = 8
IFA_F_NODAD = 0x02


def new_addr6(index: int, cidr: str) -> Request:
    """IPv6 address with IFA_F_NODAD: usable at once, no duplicate address detection delay."""
    iface = ipaddress.IPv6Interface(cidr)
    body = _IFADDR.pack(socket.AF_INET6, iface.network.prefixlen, IFA_F_NODAD, 0, index)
    body += attr(IFA_LOCAL, iface.ip.packed) + attr(IFA_ADDRESS, iface.ip.packed)
    body += attr_u32(IFA_FLAGS, IFA_F_NODAD)
    return RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def del_addr6(index: int, cidr: str) -> Request:
    """Remove the IPv6 address `cidr` from link `index`."""
    iface = ipaddress.IPv6Interface(cidr)
    body = _IFADDR.pack(socket.AF_INET6, iface.network.prefixlen, 0, 0, index)
    return RTM_DELADDR, NLM_F_ACK, body + attr(IFA_ADDRESS, iface.ip.packed)


def new_default_route6(gateway: str) -> Request:
    """`::/0 via GATEWAY` in the main table."""
    head = _RTMSG.pack(
        socket.AF_INET6, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body = head + attr(RTA_GATEWAY, ipaddress.IPv6Address(gateway).packed)
    return RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def new_default_route(gateway: str) -> Request:
    head = _RTMSG.pack(
        socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body = head + attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
    return RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


# --- replies --------------------------------------------------------------------------------


class Link:
    """The few fields of an RTM_NEWLINK reply that the shell needs.

    Raises:
        ValueError: the payload is malformed.
    """

    __slots__ = ("alias", "flags", "group", "index", "kind", "link", "master", "name")

    def __init__(self, payload: bytes) -> None:
        _family, _type, self.index, self.flags, _change = _fixed(_IFINFO, payload, "ifinfomsg")
        self.name = ""
        self.kind: str | None = None
        self.alias: str | None = None
        self.master = 0
        self.group = 0
        self.link = 0  # a veth's peer ifindex (in the peer's namespace)
        for kind, a, b in attrs(payload, _IFINFO.size, len(payload)):
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
            chunks.append(_HDR.pack(16 + len(body), kind, NLM_F_REQUEST | flags, first + offset, 0))
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
                size, kind, flags, seq, _pid = _HDR.unpack_from(data, pos)
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


def check(result: list[bytes] | NetlinkError) -> list[bytes]:
    """The replies of one request, or raise its error."""
    if isinstance(result, NetlinkError):
        raise result
    return result
