"""`agent.kernel.rtnl` against pyroute2 as an independent oracle (no kernel, no root).

Every message agentd sends: what `rtnl` encodes, pyroute2 decodes to the expected header and
attributes (nested ones included), and pyroute2 encodes the same message to the same bytes.
Every reply agentd reads: what pyroute2 encodes like the kernel, `rtsocket.Link`,
`rtsocket.route_dst`, `rtsocket.nsid_of` and the dump readers (`agent.kernel.dumps`) decode to
the same fields. Message
types and flags are pyroute2's constants, not ours. A reply that does not fit raises
`ValueError` (the one strict walker, `agent.core.nlattrs`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_ECHO,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    nlmsg_base,
    nlmsgerr,
)
from pyroute2.netlink import rtnl as pr
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from agent.core import naming
from agent.kernel import dumps, rtnl, rtsocket
from agent.kernel.base import LinkInfo

SEQ = 7
CREATE = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
NO_LINK = {"family": 0, "ifi_type": 0, "index": 0, "flags": 0, "change": 0}

names = st.from_regex(r"[A-Za-z0-9_.:-]{1,15}", fullmatch=True)
texts = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=80)
u32s = st.integers(0, 2**32 - 1)
indexes = st.integers(1, 2**31 - 1)
mtus = st.integers(68, 65535)
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
cidrs4 = st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
cidrs6 = st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}")


def wire(request: rtnl.Request) -> bytes:
    """`request` as `RtSocket.transact` sends it (header, then body)."""
    kind, flags, body = request
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, SEQ, 0) + body


def plain(value: Any) -> Any:
    """A pyroute2 message or nested attribute as builtins: its fields and an `attrs` list."""
    if not isinstance(value, nlmsg_base):
        return value
    out = {name: value[name] for name, _ in value.fields if not name.startswith("__")}
    out["attrs"] = [(slot[0], plain(slot[1])) for slot in value["attrs"]]
    return out


class Expect:
    """A message as pyroute2 names it: class, type, flags, header fields, attributes."""

    def __init__(self, cls: type, kind: int, flags: int, fields: dict, attrs: list) -> None:
        self.cls, self.kind, self.flags, self.fields, self.attrs = cls, kind, flags, fields, attrs

    def check(self, request: rtnl.Request) -> None:
        data = wire(request)
        got = self.cls(data)
        got.decode()
        assert got["header"]["length"] == len(data)
        assert (got["header"]["type"], got["header"]["flags"]) == (
            self.kind,
            NLM_F_REQUEST | self.flags,
        )
        assert plain(got) == {**self.fields, "attrs": self.attrs}
        ref = self.cls()
        ref["header"]["type"] = self.kind
        ref["header"]["flags"] = NLM_F_REQUEST | self.flags
        ref["header"]["sequence_number"] = SEQ
        for name, value in self.fields.items():
            ref[name] = value
        ref["attrs"] = self.attrs
        ref.encode()
        assert bytes(ref.data) == data


def linkinfo(*attrs: tuple[str, Any]) -> tuple[str, dict]:
    return ("IFLA_LINKINFO", {"attrs": list(attrs)})


def ntop(address: Any) -> str:
    """An address as pyroute2 writes it (`inet_ntop`: `::ffff:0.0.0.0`, not `::ffff:0:0`)."""
    address = ipaddress.ip_address(address)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, address.packed)


def ip(cidr: str) -> str:
    return ntop(ipaddress.ip_interface(cidr).ip)


def addr_fields(cidr: str, flags: int = 0, index: int = 0) -> dict:
    iface = ipaddress.ip_interface(cidr)
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    return {
        "family": family,
        "prefixlen": iface.network.prefixlen,
        "flags": flags,
        "scope": 0,
        "index": index,
    }


def route_fields(family: int) -> dict:
    return {
        "family": family, "dst_len": 0, "src_len": 0, "tos": 0, "table": 254, "proto": 3,
        "scope": 0, "type": 1, "flags": 0,
    }  # fmt: skip


# --- what agentd sends -----------------------------------------------------------------------


@given(name=names, mtu=mtus, group=u32s)
def test_new_bridge(name: str, mtu: int, group: int) -> None:
    Expect(ifinfmsg, pr.RTM_NEWLINK, CREATE, NO_LINK, [
        ("IFLA_IFNAME", name), ("IFLA_ADDRESS", rtnl.bridge_mac(name)), ("IFLA_MTU", mtu),
        ("IFLA_GROUP", group), linkinfo(("IFLA_INFO_KIND", "bridge")),
    ]).check(rtnl.new_bridge(name, mtu, group))  # fmt: skip


@given(name=names, peer=names, master=u32s, group=u32s, mtu=mtus, mac=macs, fd=u32s)
def test_new_veth_with_its_peer_nested(name, peer, master, group, mtu, mac, fd) -> None:
    peer_msg = {**NO_LINK, "attrs": [
        ("IFLA_IFNAME", peer), ("IFLA_ADDRESS", mac), ("IFLA_MTU", mtu),
        ("IFLA_NET_NS_FD", fd), ("IFLA_NUM_TX_QUEUES", 1), ("IFLA_NUM_RX_QUEUES", 1),
    ]}  # fmt: skip
    Expect(ifinfmsg, pr.RTM_NEWLINK, CREATE | NLM_F_ECHO, NO_LINK, [
        ("IFLA_IFNAME", name), ("IFLA_MTU", mtu), ("IFLA_NUM_TX_QUEUES", 1),
        ("IFLA_NUM_RX_QUEUES", 1), ("IFLA_MASTER", master), ("IFLA_GROUP", group),
        linkinfo(
            ("IFLA_INFO_KIND", "veth"),
            ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer_msg)]}),
        ),
    ]).check(rtnl.new_veth(
        name=name, master=master, group=group, mtu=mtu, peer=peer, peer_mac=mac, netns_fd=fd
    ))  # fmt: skip


HAIRPIN = linkinfo(
    ("IFLA_INFO_SLAVE_KIND", "bridge"),
    ("IFLA_INFO_SLAVE_DATA", {"attrs": [("IFLA_BRPORT_MODE", 1)]}),
)


@given(name=names, alias=texts, hairpin=st.booleans(), up=st.booleans())
def test_set_alias_with_hairpin_and_up(name: str, alias: str, hairpin: bool, up: bool) -> None:
    attrs = [("IFLA_IFNAME", name), ("IFLA_IFALIAS", alias), *([HAIRPIN] if hairpin else [])]
    fields = {**NO_LINK, "flags": int(up), "change": int(up)}
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, fields, attrs).check(
        rtnl.set_alias(name, alias, hairpin=hairpin, up=up)
    )


@given(name=names)
def test_set_hairpin(name: str) -> None:
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, NO_LINK, [("IFLA_IFNAME", name), HAIRPIN]).check(
        rtnl.set_hairpin(name)
    )


@given(name=names, group=u32s)
def test_retire_is_down_out_of_the_bridge_and_in_the_group(name: str, group: int) -> None:
    fields = {**NO_LINK, "flags": 0, "change": 1}  # IFF_UP cleared under its change mask
    attrs = [("IFLA_IFNAME", name), ("IFLA_MASTER", 0), ("IFLA_GROUP", group)]
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, fields, attrs).check(rtnl.retire(name, group))


@given(name=names, group=u32s)
def test_set_group(name: str, group: int) -> None:
    attrs = [("IFLA_IFNAME", name), ("IFLA_GROUP", group)]
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, NO_LINK, attrs).check(rtnl.set_group(name, group))


@given(group=u32s)
def test_del_group(group: int) -> None:
    Expect(ifinfmsg, pr.RTM_DELLINK, NLM_F_ACK, NO_LINK, [("IFLA_GROUP", group)]).check(
        rtnl.del_group(group)
    )


@given(name=names)
def test_get_link_and_del_link(name: str) -> None:
    Expect(ifinfmsg, pr.RTM_GETLINK, 0, NO_LINK, [("IFLA_IFNAME", name)]).check(rtnl.get_link(name))
    Expect(ifinfmsg, pr.RTM_DELLINK, NLM_F_ACK, NO_LINK, [("IFLA_IFNAME", name)]).check(
        rtnl.del_link(name)
    )


@given(index=indexes, name=names)
def test_set_up_by_index_or_name(index: int, name: str) -> None:
    up = {**NO_LINK, "flags": 1, "change": 1}
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, {**up, "index": index}, []).check(
        rtnl.set_up(index)
    )
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, up, [("IFLA_IFNAME", name)]).check(
        rtnl.set_up(name=name)
    )


@given(name=names, master=u32s)
def test_set_master_up(name: str, master: int) -> None:
    fields = {**NO_LINK, "flags": 1, "change": 1}
    attrs = [("IFLA_IFNAME", name), ("IFLA_MASTER", master)]
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, fields, attrs).check(
        rtnl.set_master_up(name, master)
    )


@given(index=indexes)
def test_set_no_ipv6_addresses(index: int) -> None:
    mode = {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", 1)]}  # IN6_ADDR_GEN_MODE_NONE
    attrs = [("IFLA_AF_SPEC", {"attrs": [("AF_INET6", mode)]})]
    Expect(ifinfmsg, pr.RTM_NEWLINK, NLM_F_ACK, {**NO_LINK, "index": index}, attrs).check(
        rtnl.set_no_ipv6_addresses(index)
    )


@given(fd=u32s, nsid=st.integers(-(2**31), 2**31 - 1))
def test_new_nsid(fd: int, nsid: int) -> None:
    attrs = [("NETNSA_FD", fd), ("NETNSA_NSID", nsid & 0xFFFFFFFF)]  # pyroute2 reads it u32
    Expect(nsidmsg, pr.RTM_NEWNSID, NLM_F_ACK, {"rtgen_family": 0}, attrs).check(
        rtnl.new_nsid(fd, nsid)
    )


@given(index=indexes, cidr=cidrs4)
def test_new_addr_and_del_addr(index: int, cidr: str) -> None:
    iface = ipaddress.IPv4Interface(cidr)
    attrs = [("IFA_LOCAL", ip(cidr)), ("IFA_ADDRESS", ip(cidr))]
    if iface.network.prefixlen < 31:
        attrs.append(("IFA_BROADCAST", ntop(iface.network.broadcast_address)))
    fields = addr_fields(cidr, index=index)
    Expect(ifaddrmsg, pr.RTM_NEWADDR, CREATE, fields, attrs).check(rtnl.new_addr(index, cidr))
    Expect(ifaddrmsg, pr.RTM_DELADDR, NLM_F_ACK, fields, [("IFA_LOCAL", ip(cidr))]).check(
        rtnl.del_addr(index, cidr)
    )


@given(index=indexes, cidr=cidrs6)
def test_new_addr6_without_dad_and_del_addr6(index: int, cidr: str) -> None:
    nodad = 0x02
    attrs = [("IFA_LOCAL", ip(cidr)), ("IFA_ADDRESS", ip(cidr)), ("IFA_FLAGS", nodad)]
    Expect(ifaddrmsg, pr.RTM_NEWADDR, CREATE, addr_fields(cidr, nodad, index), attrs).check(
        rtnl.new_addr6(index, cidr)
    )
    fields, attrs = addr_fields(cidr, index=index), [("IFA_ADDRESS", ip(cidr))]
    Expect(ifaddrmsg, pr.RTM_DELADDR, NLM_F_ACK, fields, attrs).check(rtnl.del_addr6(index, cidr))


@given(gateway=st.ip_addresses(v=4), gateway6=st.ip_addresses(v=6))
def test_new_default_routes(gateway, gateway6) -> None:
    Expect(rtmsg, pr.RTM_NEWROUTE, CREATE, route_fields(socket.AF_INET), [
        ("RTA_GATEWAY", str(gateway))
    ]).check(rtnl.new_default_route(str(gateway)))  # fmt: skip
    Expect(rtmsg, pr.RTM_NEWROUTE, CREATE, route_fields(socket.AF_INET6), [
        ("RTA_GATEWAY", ntop(gateway6))
    ]).check(rtnl.new_default_route6(str(gateway6)))  # fmt: skip


def test_the_dumps() -> None:
    skip_stats = 1 << 3  # RTEXT_FILTER_SKIP_STATS
    Expect(ifinfmsg, pr.RTM_GETLINK, NLM_F_DUMP, NO_LINK, [("IFLA_EXT_MASK", skip_stats)]).check(
        rtnl.dump_links()
    )
    Expect(ifaddrmsg, pr.RTM_GETADDR, NLM_F_DUMP, {
        "family": 0, "prefixlen": 0, "flags": 0, "scope": 0, "index": 0
    }, []).check(rtnl.dump_addrs())  # fmt: skip
    Expect(rtmsg, pr.RTM_GETROUTE, NLM_F_DUMP, {
        **route_fields(socket.AF_INET), "table": 0, "proto": 0, "type": 0
    }, []).check(rtnl.dump_routes())  # fmt: skip
    Expect(nsidmsg, pr.RTM_GETNSID, NLM_F_DUMP, {"rtgen_family": 0}, []).check(rtnl.dump_nsids())


# --- what agentd reads -----------------------------------------------------------------------


def encode(msg: nlmsg_base, kind: int, fields: dict, attrs: list) -> bytes:
    msg["header"]["type"] = kind
    for name, value in fields.items():
        msg[name] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


NOISE = [("IFLA_MTU", 1500), ("IFLA_TXQLEN", 1000), ("IFLA_OPERSTATE", "UP"), ("IFLA_QDISC", "q")]


@st.composite
def kernel_links(draw: st.DrawFn) -> tuple[bytes, dict]:
    """An RTM_NEWLINK like the kernel's (attributes in any order), and its expected fields."""
    want = {
        "index": draw(indexes), "flags": draw(u32s), "name": draw(st.none() | names),
        "alias": draw(st.none() | texts), "master": draw(st.none() | u32s),
        "group": draw(st.none() | u32s), "link": draw(st.none() | u32s),
        "kind": draw(st.none() | st.sampled_from(["bridge", "veth", "dummy"])),
    }  # fmt: skip
    attrs = [a for a in NOISE if draw(st.booleans())]
    for key, nla in [("name", "IFLA_IFNAME"), ("alias", "IFLA_IFALIAS"), ("master", "IFLA_MASTER"),
                     ("group", "IFLA_GROUP"), ("link", "IFLA_LINK")]:  # fmt: skip
        if want[key] is not None:
            attrs.append((nla, want[key]))
    if want["kind"] is not None:
        attrs.append(linkinfo(("IFLA_INFO_KIND", want["kind"])))
    attrs = draw(st.permutations(attrs))
    data = encode(
        ifinfmsg(), pr.RTM_NEWLINK, {"index": want["index"], "flags": want["flags"]}, attrs
    )
    return data, want


@given(case=kernel_links())
def test_link_reads_what_pyroute2_encodes(case: tuple[bytes, dict]) -> None:
    data, want = case
    link = rtsocket.Link(data[16:])
    assert (link.index, link.flags, link.name, link.alias, link.kind) == (
        want["index"], want["flags"], want["name"] or "", want["alias"], want["kind"],
    )  # fmt: skip
    assert (link.master, link.group, link.link) == tuple(
        want[k] or 0 for k in ("master", "group", "link")
    )


@given(
    table=st.integers(0, 255), rta_table=st.none() | u32s, dst=st.none() | st.ip_addresses(v=4),
    dst_len=st.integers(0, 32), oif=st.none() | u32s, gateway=st.none() | st.ip_addresses(v=4),
    family=st.sampled_from([socket.AF_INET, socket.AF_INET6]),
)  # fmt: skip
def test_route_dst_reads_what_pyroute2_encodes(
    table, rta_table, dst, dst_len, oif, gateway, family
):
    attrs: list = []
    if family == socket.AF_INET:
        for nla, value in [("RTA_TABLE", rta_table), ("RTA_DST", dst), ("RTA_OIF", oif),
                           ("RTA_GATEWAY", gateway), ("RTA_PRIORITY", 100)]:  # fmt: skip
            if value is not None:
                attrs.append((nla, value if isinstance(value, int) else str(value)))
    fields = {**route_fields(family), "table": table, "dst_len": dst_len}
    data = encode(rtmsg(), pr.RTM_NEWROUTE, fields, attrs)
    found = rtsocket.route_dst(data[16:])
    if family != socket.AF_INET:
        assert found is None
        return
    dst_text = str(dst) if dst is not None else "0.0.0.0"
    table_found = rta_table if rta_table is not None else table
    assert found == (table_found, f"{dst_text}/{dst_len}", oif or 0)


@given(nsid=st.integers(-1, 2**31 - 1), extra=st.booleans())
def test_nsid_of_reads_what_pyroute2_encodes(nsid: int, extra: bool) -> None:
    attrs = [("NETNSA_NSID", nsid & 0xFFFFFFFF)]
    if extra:
        attrs.insert(0, ("NETNSA_CURRENT_NSID", 5))
    data = encode(nsidmsg(), pr.RTM_NEWNSID, {"rtgen_family": 0}, attrs)
    assert rtsocket.nsid_of(data[16:]) == nsid  # -1: NETNSA_NSID_NOT_ASSIGNED
    assert rtsocket.nsid_of(encode(nsidmsg(), pr.RTM_NEWNSID, {"rtgen_family": 0}, [])[16:]) is None


@given(err=st.integers(1, 4095), text=texts)
def test_an_extended_ack_message_is_read(err: int, text: str) -> None:
    body = encode(nlmsgerr(), 2, {"error": -err}, [("NLMSGERR_ATTR_MSG", text)])[16:]
    request = struct.pack("=IHHII", 32, pr.RTM_NEWLINK, 5, SEQ, 0)  # echoed back (CAP_ACK)
    error = rtsocket._error(err, rtnl.NLM_F_ACK_TLVS, body[:4] + request + body[4:])
    assert (error.errno, error.detail) == (err, text)


class DumpSocket:
    """An `RtSocket` that answers the link and address dumps with pyroute2-encoded replies."""

    def __init__(self, replies: dict[int, list[bytes]]) -> None:
        self.replies = replies

    def transact(self, requests: list[rtnl.Request]) -> list[list[bytes]]:
        return [[m[16:] for m in self.replies[kind]] for kind, _, _ in requests]


def test_owned_links_reads_the_dumps_pyroute2_encodes() -> None:
    alias = naming.veth_alias("ab" * 32)

    def link(index: int, attrs: list) -> bytes:
        return encode(ifinfmsg(), pr.RTM_NEWLINK, {"index": index, "flags": 1}, attrs)

    def addr(cidr: str, index: int) -> bytes:
        attrs = [("IFA_ADDRESS", ip(cidr)), ("IFA_LOCAL", ip(cidr)), ("IFA_LABEL", "x")]
        return encode(ifaddrmsg(), pr.RTM_NEWADDR, addr_fields(cidr, 0, index), attrs)

    rt = DumpSocket({
        pr.RTM_GETLINK: [
            link(1, [("IFLA_IFNAME", "lo")]),
            link(7, [("IFLA_IFNAME", "br-1"), ("IFLA_GROUP", naming.LINK_GROUP),
                     linkinfo(("IFLA_INFO_KIND", "bridge"))]),
            link(9, [("IFLA_IFNAME", "na1"), ("IFLA_IFALIAS", alias), ("IFLA_MASTER", 7),
                     linkinfo(("IFLA_INFO_KIND", "veth"))]),
        ],
        pr.RTM_GETADDR: [addr("127.0.0.1/8", 1), addr("172.18.0.1/16", 7), addr("fd00::1/64", 7)],
    })  # fmt: skip
    assert dumps.owned_links(rt) == [  # type: ignore[arg-type]
        LinkInfo(7, "br-1", "bridge", "", 0, True, ("172.18.0.1/16", "fd00::1/64"),
                 naming.LINK_GROUP),
        LinkInfo(9, "na1", "veth", alias, 7, True, (), 0),
    ]  # fmt: skip


# --- strict: a reply that does not fit raises ValueError ----------------------------------


def _link_payload(attrs: bytes) -> bytes:
    return struct.pack("=BxHiII", 0, 1, 3, 0, 0) + attrs


_OVERRUNNING_KIND = rtnl.attr(rtnl.IFLA_LINKINFO, struct.pack("=HH", 40, 1) + b"veth")
_ROUTE = struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 0, 0, 1, 0)


MALFORMED: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("ifinfomsg cut short", rtsocket.Link, b"\0" * 12),
    ("attribute past the end", rtsocket.Link, _link_payload(struct.pack("=HH", 12, 3) + b"eth0")),
    (
        "attribute length below 4",
        rtsocket.Link,
        _link_payload(struct.pack("=HH", 2, 3) + b"\0" * 4),
    ),
    ("half an attribute header", rtsocket.Link, _link_payload(b"\x08\0")),
    ("short master", rtsocket.Link, _link_payload(rtnl.attr(rtnl.IFLA_MASTER, b"\1\0"))),
    ("nested kind past its nest", rtsocket.Link, _link_payload(_OVERRUNNING_KIND)),
    ("rtmsg cut short", rtsocket.route_dst, b"\x02" + b"\0" * 8),
    ("short destination", rtsocket.route_dst, _ROUTE + rtnl.attr(rtnl.RTA_DST, b"\x0a\0")),
    ("nsid cut short", rtsocket.nsid_of, b"\0\0\0\0" + rtnl.attr(rtnl.NETNSA_NSID, b"\1")),
    ("rtgenmsg cut short", rtsocket.nsid_of, b"\0"),
]


@pytest.mark.parametrize(("reader", "payload"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])  # fmt: skip
def test_a_reply_that_does_not_fit_raises_value_error(reader, payload: bytes) -> None:
    with pytest.raises(ValueError):
        reader(payload)


@given(case=kernel_links(), cut=st.integers(1, 64))
@settings(max_examples=200)
def test_a_cut_reply_is_read_or_raises_value_error_never_else(case, cut: int) -> None:
    """Cut anywhere: what is left is read, or ValueError; never struct.error or IndexError."""
    data, _ = case
    payload = data[16:-cut] if cut < len(data) - 16 else data[16:17]
    with contextlib.suppress(ValueError):
        rtsocket.Link(payload)
