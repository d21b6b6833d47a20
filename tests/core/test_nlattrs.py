"""agent.core.nlattrs: the one attribute walker reads what was written, and anything else is a
ValueError naming its offset, never an IndexError or struct.error, never a read past `end`."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import nlattrs


def nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def walk(buf: bytes, pos: int = 0, end: int | None = None) -> list[tuple[int, bytes]]:
    end = len(buf) if end is None else end
    return [(kind, buf[a:b]) for kind, a, b in nlattrs.attrs(buf, pos, end)]


attributes = st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=40)), max_size=8)


@given(attrs=attributes, head=st.binary(max_size=12), tail=st.binary(max_size=12))
def test_reads_back_what_was_written(attrs, head: bytes, tail: bytes) -> None:
    body = b"".join(nla(k, p) for k, p in attrs)
    buf = head + body + tail  # the walk stays within [pos, end)
    assert walk(buf, len(head), len(head) + len(body)) == attrs


def test_flag_bits_are_masked_off() -> None:
    nested, net_order = 1 << 15, 1 << 14
    buf = nla(18 | nested, nla(1, b"veth\0")) + nla(2 | net_order, b"\0\0\0\1")
    assert [k for k, _ in walk(buf)] == [18, 2]


MALFORMED = [
    ("header cut short", b"\x08\0", "truncated attribute at offset 0"),
    ("length below the header", struct.pack("=HH", 3, 1) + b"\0" * 4, "bad attribute length 3"),
    ("length past the end", struct.pack("=HH", 9, 1) + b"\0" * 4, "bad attribute length 9"),
    ("second one cut short", nla(1, b"ab") + b"\x05\0\1", "truncated attribute at offset 8"),
]


@pytest.mark.parametrize(("buf", "message"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])  # fmt: skip
def test_an_attribute_that_does_not_fit_raises_value_error(buf: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        walk(buf)


def test_the_attributes_before_a_bad_one_come_first() -> None:
    it = nlattrs.attrs(nla(1, b"ok") + b"\xff\xff", 0, 10)
    assert next(it)[0] == 1
    with pytest.raises(ValueError):
        next(it)


def test_the_end_given_bounds_the_walk_not_the_buffer() -> None:
    buf = nla(1, b"abcd") + nla(2, b"efgh")
    with pytest.raises(ValueError, match="bad attribute length 8 at offset 0"):
        walk(buf, 0, 6)  # a nest shorter than what it holds


@given(buf=st.binary(max_size=64), pos=st.integers(0, 8))
def test_any_bytes_walk_or_raise_value_error_within_bounds(buf: bytes, pos: int) -> None:
    end = len(buf)
    try:
        spans = [(a, b) for _, a, b in nlattrs.attrs(buf, pos, end)]
    except ValueError:
        return
    assert all(pos + 4 <= a <= b <= end for a, b in spans)


def test_fixed_size_payloads() -> None:
    buf = struct.pack("=I", 7) + struct.pack("=i", -1) + b"\x0a\0\0\1"
    assert nlattrs.u32(buf, 0, 4) == 7 and nlattrs.u32(buf, 0, 8) == 7
    assert nlattrs.s32(buf, 4, 8) == -1
    assert nlattrs.exact(buf, 8, 12, 4) == b"\x0a\0\0\1"
    assert nlattrs.be32(buf, 8, 12) == 0x0A000001  # nf_tables' big-endian attributes
    for call in (
        lambda: nlattrs.u32(buf, 0, 3),
        lambda: nlattrs.be32(buf, 9, 12),
        lambda: nlattrs.s32(buf, 9, 12),
        lambda: nlattrs.exact(buf, 8, 11, 4),
        lambda: nlattrs.exact(buf, 0, 12, 4),
    ):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize(
    ("payload", "text"),
    [(b"eth0\0", "eth0"), (b"eth0", "eth0"), (b"a\0b", "a"), (b"", ""), (b"br\xff\0", "br\ufffd")],
)
def test_strings_end_at_the_first_nul_or_the_payload(payload: bytes, text: str) -> None:
    buf = b"xx" + payload + b"yy"
    assert nlattrs.cstr(buf, 2, 2 + len(payload)) == text
