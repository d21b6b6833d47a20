"""rtnetlink event decoding: pure twin and Cython accelerator, event for event, error for error.

Synthetic messages (built here the way the kernel lays them out) pin the exact results; real
messages captured from this kernel (a kernel test, in the private namespace) and hypothesis
mutations of both check that the twins agree and that bad input only ever raises ValueError;
messages pyroute2 encodes (an independent oracle) decode to the fields they were made from.
"""

from __future__ import annotations

import importlib
import os
import socket
import struct
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from agent import accel
from agent.core import nlevents as pure
from agent.core.naming import LINK_GROUP
from agent.core.nlevents import AddrEvent, LinkEvent

try:
    fast: ModuleType | None = importlib.import_module("_fast.nlevents")
except ImportError:  # pragma: no cover - extension not built
    fast = None

needs_fast = pytest.mark.skipif(fast is None, reason="_fast.nlevents is not built")
IMPLS = [pytest.param(pure, id="pure"), pytest.param(fast, id="cython", marks=needs_fast)]
ALIAS = "netagent:net:" + "ab" * 32


# --- building messages like the kernel -----------------------------------------------------
def nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nlmsg(kind: int, body: bytes) -> bytes:
    size = 16 + len(body)
    return struct.pack("=IHHII", size, kind, 0, 0, 0) + body + b"\0" * (-size % 4)


def link(
    kind: int = 16,
    *,
    family: int = 0,
    index: int = 7,
    flags: int = 0x1003,
    name: str | bytes = "br-0123456789ab",
    link_kind: str | None = "bridge",
    alias: str | None = ALIAS,
    master: int | None = None,
    group: int | None = LINK_GROUP,
) -> bytes:
    body = struct.pack("=BxHiII", family, 1, index, flags, 0)
    raw_name = name.encode() if isinstance(name, str) else name
    body += nla(3, raw_name + b"\0") + nla(4, struct.pack("=I", 1500))
    if master is not None:
        body += nla(10, struct.pack("=I", master))
    if alias is not None:
        body += nla(20, alias.encode() + b"\0")
    if group is not None:
        body += nla(27, struct.pack("=I", group))
    if link_kind is not None:
        body += nla(18, nla(1, link_kind.encode() + b"\0") + nla(2, b""))
    body += nla(23, b"\0" * 196)  # IFLA_STATS64-sized filler, as the kernel sends
    return nlmsg(kind, body)


def addr(
    kind: int = 20,
    *,
    family: int = 2,
    index: int = 7,
    prefixlen: int = 24,
    local: bytes | None = bytes([10, 1, 0, 1]),
    address: bytes | None = bytes([10, 1, 0, 1]),
) -> bytes:
    body = struct.pack("=BBBBi", family, prefixlen, 0x80, 0, index)
    if address is not None:
        body += nla(1, address)
    if local is not None:
        body += nla(2, local)
    body += nla(3, b"br0\0") + nla(8, struct.pack("=I", 0x80))
    return nlmsg(kind, body)


BRIDGE = LinkEvent("new", 7, "br-0123456789ab", "bridge", ALIAS, 0, True, LINK_GROUP)
V6 = bytes.fromhex("fd000000000000000000000000000001")

CASES = [
    ("newlink", link(), [BRIDGE]),
    (
        "dellink veth, no alias",
        link(17, index=9, name="na0123456789abc", link_kind="veth", alias=None, master=7, flags=0),
        [LinkEvent("del", 9, "na0123456789abc", "veth", None, 7, False, LINK_GROUP)],
    ),
    (
        "no linkinfo, no group",
        link(link_kind=None, group=None, alias=None),
        [LinkEvent("new", 7, "br-0123456789ab", None, None, 0, True, 0)],
    ),
    ("AF_BRIDGE port message skipped", link(17, family=7), []),
    ("newaddr v4", addr(), [AddrEvent("new", 7, 2, "10.1.0.1", 24)]),
    (
        "point-to-point: IFA_LOCAL wins",
        addr(21, local=bytes([10, 0, 0, 1]), address=bytes([10, 0, 0, 2]), prefixlen=32),
        [AddrEvent("del", 7, 2, "10.0.0.1", 32)],
    ),
    (
        "v6 has only IFA_ADDRESS",
        addr(family=10, local=None, address=V6, prefixlen=64),
        [AddrEvent("new", 7, 10, "fd00::1", 64)],
    ),
    ("other address family skipped", addr(family=1), []),
    ("route, done, error skipped", nlmsg(24, b"\0" * 12) + nlmsg(3, b"\0" * 4) + nlmsg(2, b""), []),
    (
        "several messages",
        link() + addr() + link(17),
        [
            BRIDGE,
            AddrEvent("new", 7, 2, "10.1.0.1", 24),
            LinkEvent("del", 7, "br-0123456789ab", "bridge", ALIAS, 0, True, LINK_GROUP),
        ],
    ),
    (
        "undecodable name replaced",
        link(name=b"br\xff", alias=None),
        [LinkEvent("new", 7, "br\ufffd", "bridge", None, 0, True, LINK_GROUP)],
    ),
    ("empty", b"", []),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("buf", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode_exact(impl: ModuleType, buf: bytes, expected: list[object]) -> None:
    assert impl.decode(buf) == expected
    assert impl.decode(bytearray(buf)) == expected
    assert impl.decode(memoryview(b"\0" + buf)[1:]) == expected


def test_unterminated_string_is_read_to_its_end() -> None:
    body = struct.pack("=BxHiII", 0, 1, 3, 0, 0) + nla(3, b"eth0")
    for impl in (pure, fast or pure):
        assert impl.decode(nlmsg(16, body))[0].name == "eth0"


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_keeps_group_alias_and_indexes(impl: ModuleType) -> None:
    ours = link(index=1)
    adopted = link(index=2, group=None)  # group lost, alias kept
    user_bridge = link(index=3, group=None, alias="my bridge")
    stranger = link(index=4, group=None, alias=None)
    short_alias = link(index=5, group=None, alias="netagent")
    buf = ours + adopted + user_bridge + stranger + short_alias
    indexes = {3}
    kept = [e.index for e in impl.decode(buf, LINK_GROUP, indexes)]
    assert kept == [1, 2, 3]
    indexes.discard(3)  # the caller's set is read at every call
    assert [e.index for e in impl.decode(buf, LINK_GROUP, indexes)] == [1, 2]
    assert [e.index for e in impl.decode(buf, None, {4})] == [1, 2, 4]
    assert len(impl.decode(buf)) == 5


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_addresses_by_index(impl: ModuleType) -> None:
    buf = addr(index=7) + addr(index=8) + addr(21, index=7)
    assert [(e.action, e.index) for e in impl.decode(buf, LINK_GROUP, {7})] == [
        ("new", 7),
        ("del", 7),
    ]
    assert len(impl.decode(buf, LINK_GROUP, None)) == 3  # no index set: every address
    assert impl.decode(buf, None, set()) == []


def _corrupt_attr_length(msg: bytes, size: int) -> bytes:
    out = bytearray(msg)
    struct.pack_into("=H", out, 32, size)  # first attribute after the 16-byte ifinfomsg
    return bytes(out)


MALFORMED = [
    ("short header", b"\x10\0\0\0"),
    ("length below header", struct.pack("=IHHII", 8, 16, 0, 0, 0)),
    ("length past the end", link()[:-4]),
    ("trailing partial message", link() + b"\0" * 7),
    ("short ifinfomsg", nlmsg(16, b"\0" * 12)),
    ("short ifaddrmsg", nlmsg(20, b"\x02" + b"\0" * 6)),
    ("attribute length 2", _corrupt_attr_length(link(), 2)),
    ("attribute overruns message", _corrupt_attr_length(link(), 4000)),
    ("short group", nlmsg(16, struct.pack("=BxHiII", 0, 1, 3, 0, 0) + nla(27, b"\1\0"))),
    ("v4 address of 16 bytes", addr(local=V6, address=None)),
    ("address missing", addr(local=None, address=None)),
    (
        "bad nested linkinfo",
        nlmsg(16, struct.pack("=BxHiII", 0, 1, 3, 0, 0) + nla(18, b"\x09\0\1\0")),
    ),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("buf", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_raises_value_error(impl: ModuleType, buf: bytes) -> None:
    with pytest.raises(ValueError):
        impl.decode(buf)


def test_filtered_out_messages_are_not_walked_deeper() -> None:
    """A link dropped by the filter never has its nested LINKINFO read (both twins)."""
    bad_info = nlmsg(16, struct.pack("=BxHiII", 0, 1, 3, 0, 0) + nla(18, b"\x09\0\1\0"))
    for impl in (pure, fast or pure):
        assert impl.decode(bad_info, LINK_GROUP, set()) == []


def test_accel_selects_the_extension_when_built() -> None:
    forced_pure = os.environ.get("NETAGENT_PURE") == "1"
    assert accel.nlevents is (pure if forced_pure or fast is None else fast)


# --- differential and fuzz -----------------------------------------------------------------
def outcome(impl: ModuleType, buf: bytes, *args: object) -> object:
    try:
        return impl.decode(buf, *args)
    except ValueError as exc:
        return ("ValueError", str(exc))


SEEDS = [link(), link(17, alias=None), addr(), addr(family=10, local=None, address=V6)]
SEED_BUF = b"".join(SEEDS)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    buf = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 3))
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        if choice == 0:
            buf[pos] = draw(st.integers(0, 255))
        elif choice == 1:
            del buf[pos:]
        elif choice == 2:
            buf[pos:pos] = draw(st.binary(max_size=8))
        else:  # plausible small lengths where lengths live
            buf[pos : pos + 2] = struct.pack("=H", draw(st.integers(0, 64)))
    return bytes(buf)


FILTERS = st.sampled_from([(), (LINK_GROUP, None), (LINK_GROUP, {7}), (None, {7, 9})])


@given(buf=st.binary(max_size=512), args=FILTERS)
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes_decode_or_value_error(buf: bytes, args: tuple[object, ...]) -> None:
    results = [outcome(impl, buf, *args) for impl in (pure, fast or pure)]
    assert results[0] == results[1]


@given(buf=mutated(SEED_BUF), args=FILTERS)
@settings(max_examples=500, deadline=None)
def test_fuzz_mutated_messages_twins_agree(buf: bytes, args: tuple[object, ...]) -> None:
    results = [outcome(impl, buf, *args) for impl in (pure, fast or pure)]
    assert results[0] == results[1]


# --- pyroute2 as the independent oracle ----------------------------------------------------
def _encode(msg: object, kind: int, fields: dict, attrs: list) -> bytes:
    msg["header"]["type"] = kind  # type: ignore[index]
    for name, value in fields.items():
        msg[name] = value  # type: ignore[index]
    msg["attrs"] = attrs  # type: ignore[index]
    msg.encode()  # type: ignore[attr-defined]
    return bytes(msg.data)  # type: ignore[attr-defined]


NAMES = st.from_regex(r"[A-Za-z0-9_.:-]{1,15}", fullmatch=True)
TEXTS = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=60)
U32 = st.integers(0, 2**32 - 1)


@st.composite
def pyroute2_links(draw: st.DrawFn) -> tuple[bytes, LinkEvent | None, dict]:
    """A link notification encoded by pyroute2 (attributes in any order), the event it means
    (None: an AF_BRIDGE port message), and its fields for the filter."""
    kind = draw(st.sampled_from([16, 17]))
    family = draw(st.sampled_from([0, 0, 0, 7]))
    index, flags = draw(st.integers(1, 2**31 - 1)), draw(U32)
    name, alias = draw(st.none() | NAMES), draw(st.none() | TEXTS | st.just(ALIAS))
    master, group = draw(st.none() | U32), draw(st.none() | U32 | st.just(LINK_GROUP))
    link_kind = draw(st.none() | st.sampled_from(["bridge", "veth", "dummy"]))
    attrs = [("IFLA_MTU", 1500), ("IFLA_TXQLEN", 1000), ("IFLA_OPERSTATE", "DOWN")]
    attrs = [a for a in attrs if draw(st.booleans())]
    for nla_name, value in [("IFLA_IFNAME", name), ("IFLA_IFALIAS", alias),
                            ("IFLA_MASTER", master), ("IFLA_GROUP", group)]:  # fmt: skip
        if value is not None:
            attrs.append((nla_name, value))
    if link_kind is not None:
        attrs.append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", link_kind)]}))
    attrs = draw(st.permutations(attrs))
    fields = {"family": family, "index": index, "flags": flags}
    data = _encode(ifinfmsg(), kind, fields, attrs)
    event = LinkEvent(
        "new" if kind == 16 else "del", index, name or "", link_kind, alias, master or 0,
        bool(flags & 1), group or 0,
    )  # fmt: skip
    return data, (event if family == 0 else None), {"group": group or 0, "alias": alias}


@st.composite
def pyroute2_addrs(draw: st.DrawFn) -> tuple[bytes, AddrEvent]:
    """An address notification encoded by pyroute2, and the event it means."""
    kind = draw(st.sampled_from([20, 21]))
    version = draw(st.sampled_from([4, 6]))
    address = draw(st.ip_addresses(v=version))
    peer = draw(st.ip_addresses(v=version))
    prefixlen = draw(st.integers(0, 32 if version == 4 else 128))
    index = draw(st.integers(1, 2**31 - 1))
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    # IPv4 carries IFA_LOCAL (ours) and IFA_ADDRESS (the peer on point-to-point links); IPv6
    # only IFA_ADDRESS: the decoder takes IFA_LOCAL when there is one
    local = version == 4 and draw(st.booleans())
    attrs = [("IFA_ADDRESS", str(peer if local else address))]
    if local:
        attrs.append(("IFA_LOCAL", str(address)))
    attrs += [("IFA_LABEL", "eth0"), ("IFA_FLAGS", 0x80)][: draw(st.integers(0, 2))]
    attrs = draw(st.permutations(attrs))
    fields = {"family": family, "prefixlen": prefixlen, "index": index}
    data = _encode(ifaddrmsg(), kind, fields, attrs)
    action = "new" if kind == 20 else "del"
    return data, AddrEvent(action, index, family, str(address), prefixlen)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=pyroute2_links())
@settings(max_examples=150, deadline=None)
def test_links_pyroute2_encodes_decode_to_the_same_fields(impl: ModuleType, case) -> None:
    data, event, seen = case
    assert impl.decode(data) == ([] if event is None else [event])
    ours = seen["group"] == LINK_GROUP or (seen["alias"] or "").startswith("netagent:")
    kept = impl.decode(data, LINK_GROUP, set())
    assert kept == ([event] if event is not None and ours else [])


@pytest.mark.parametrize("impl", IMPLS)
@given(case=pyroute2_addrs())
@settings(max_examples=150, deadline=None)
def test_addresses_pyroute2_encodes_decode_to_the_same_fields(impl: ModuleType, case) -> None:
    data, event = case
    assert impl.decode(data) == [event]
    assert impl.decode(data, None, {event.index}) == [event]
    assert impl.decode(data, None, set()) == []
