"""Lean rtnetlink: the few messages of the hot path, packed with `struct`, on a raw socket.

Theory of operation: pyroute2 spends most of an attach encoding and parsing messages (DESIGN
section 4: 3.8 ms of a 5.9 ms attach, against ~2 ms of kernel work). The hot path needs only a
handful of fixed-shape requests, so they are packed here directly; `agent.kernel.rtsocket`
sends them (several in one datagram) and reads what comes back. What is encoded here is
checked against pyroute2 as an independent oracle (tests/shell/test_rtnl.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct

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

#: the fixed headers of the messages, shared with `rtsocket` (which reads the replies)
NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBi")
RTMSG = struct.Struct("=BBBBBBBBI")
RTGENMSG = struct.Struct("Bxxx")  # padded to 4
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")

Request = tuple[int, int, bytes]
"""(message type, extra flags, body after the netlink header)."""


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
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flag, flag)


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
    head = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, IFF_UP)  # flags 0 under change mask IFF_UP
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


def new_nsid(netns_fd: int, nsid: int) -> Request:
    """Give namespace `netns_fd` the id `nsid` in this namespace (EEXIST: it has one, or the id
    is taken)."""
    body = RTGENMSG.pack(socket.AF_UNSPEC) + attr_u32(NETNSA_FD, netns_fd)
    return RTM_NEWNSID, NLM_F_ACK, body + attr(NETNSA_NSID, struct.pack("i", nsid))


def dump_nsids() -> Request:
    return RTM_GETNSID, NLM_F_DUMP, RTGENMSG.pack(socket.AF_UNSPEC)


def dump_addrs() -> Request:
    """Every address of the namespace, IPv4 and IPv6."""
    return RTM_GETADDR, NLM_F_DUMP, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)


def dump_routes() -> Request:
    return RTM_GETROUTE, NLM_F_DUMP, RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)


def del_link(name: str) -> Request:
    return RTM_DELLINK, NLM_F_ACK, ifinfo() + attr_str(IFLA_IFNAME, name)


def bridge_mac(name: str) -> str:
    """The MAC a bridge named `name` is created with: locally administered, unicast, the same
    for the same name (a bridge recreated by a repair keeps it)."""
    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def new_bridge(name: str, mtu: int, group: int) -> Request:
    """A bridge with its MAC set: a bridge left to choose takes the lowest MAC of its ports,
    which changes as endpoints come and go, and every container's ARP entry for the gateway
    (its DNS server, its way out) goes stale for seconds each time (Docker sets it too)."""
    linkinfo = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge"))
    body = ifinfo() + attr_str(IFLA_IFNAME, name) + attr(IFLA_ADDRESS, mac_bytes(bridge_mac(name)))
    body += attr_u32(IFLA_MTU, mtu) + attr_u32(IFLA_GROUP, group) + linkinfo
    return RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


_ONE_QUEUE = attr_u32(IFLA_NUM_TX_QUEUES, 1) + attr_u32(IFLA_NUM_RX_QUEUES, 1)


def new_veth(
    *, name: str, master: int, group: int, mtu: int, peer: str, peer_mac: str,
    netns_fd: int | None,
) -> Request:  # fmt: skip
    """The host end is enslaved (and down) at creation; the peer is born in the namespace
    (with `netns_fd` None, in the host namespace too: Docker's Join, `kernel.hostveth`).

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
    peer_body += attr_u32(IFLA_MTU, mtu)
    if netns_fd is not None:
        peer_body += attr_u32(IFLA_NET_NS_FD, netns_fd)
    peer_body += _ONE_QUEUE
    data = attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_body))
    linkinfo = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth") + data)
    body = ifinfo() + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MTU, mtu) + _ONE_QUEUE
    body += attr_u32(IFLA_MASTER, master) + attr_u32(IFLA_GROUP, group) + linkinfo
    return RTM_NEWLINK, NLM_F_ACK | NLM_F_ECHO | NLM_F_CREATE | NLM_F_EXCL, body


def new_addr(index: int, cidr: str) -> Request:
    """IPv4 address with broadcast (as Docker's netlink library sets it for prefixes < 31)."""
    iface = ipaddress.IPv4Interface(cidr)
    packed = iface.ip.packed
    body = IFADDRMSG.pack(socket.AF_INET, iface.network.prefixlen, 0, 0, index)
    body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
    if iface.network.prefixlen < 31:
        body += attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
    return RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def del_addr(index: int, cidr: str) -> Request:
    """Remove the IPv4 address `cidr` from link `index`."""
    iface = ipaddress.IPv4Interface(cidr)
    body = IFADDRMSG.pack(socket.AF_INET, iface.network.prefixlen, 0, 0, index)
    return RTM_DELADDR, NLM_F_ACK, body + attr(IFA_LOCAL, iface.ip.packed)


IFA_FLAGS = 8
IFA_F_NODAD = 0x02


def new_addr6(index: int, cidr: str) -> Request:
    """IPv6 address with IFA_F_NODAD: usable at once, no duplicate address detection delay."""
    iface = ipaddress.IPv6Interface(cidr)
    body = IFADDRMSG.pack(socket.AF_INET6, iface.network.prefixlen, IFA_F_NODAD, 0, index)
    body += attr(IFA_LOCAL, iface.ip.packed) + attr(IFA_ADDRESS, iface.ip.packed)
    body += attr_u32(IFA_FLAGS, IFA_F_NODAD)
    return RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def del_addr6(index: int, cidr: str) -> Request:
    """Remove the IPv6 address `cidr` from link `index`."""
    iface = ipaddress.IPv6Interface(cidr)
    body = IFADDRMSG.pack(socket.AF_INET6, iface.network.prefixlen, 0, 0, index)
    return RTM_DELADDR, NLM_F_ACK, body + attr(IFA_ADDRESS, iface.ip.packed)


def new_default_route6(gateway: str) -> Request:
    """`::/0 via GATEWAY` in the main table."""
    head = RTMSG.pack(
        socket.AF_INET6, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body = head + attr(RTA_GATEWAY, ipaddress.IPv6Address(gateway).packed)
    return RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body


def new_default_route(gateway: str) -> Request:
    head = RTMSG.pack(
        socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body = head + attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
    return RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body
