"""Netlink attributes (`struct nlattr`): the one strict, bounds-checked walker.

Theory of operation: a netlink message body is a fixed header followed by attributes, each a
4-byte header (length including itself, type) and a payload padded to 4 bytes; a payload may
itself be a run of attributes (nesting). Every reader of netlink in the agent walks them here:
the kernel shell's replies (`agent.kernel.rtnl`), the event decoder's pure twin
(`agent.core.nlevents`; its Cython twin `_fast/nlevents.pyx` walks the same way, with the same
errors) and the nftables monitor (`agent.firewall.monitor`).

Strict: an attribute that does not fit the bytes it is walked in (a header cut short, a length
below 4 or past the end) raises `ValueError` naming its offset, and so does a fixed-size payload
of the wrong size. Nothing is read before its bounds are checked; nothing else is raised.
Offsets, not slices: `attrs` yields where each payload lies, so a caller that skips most
attributes copies nothing. Type bits NLA_F_NESTED and NLA_F_NET_BYTEORDER are masked off.

Pure: no I/O (tests/core/test_layering.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLA_HDRLEN = 4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED (1 << 15) and NLA_F_NET_BYTEORDER (1 << 14)

Buffer = bytes | bytearray | memoryview

_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_BE32 = struct.Struct(">I")


def attrs(buf: Buffer, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in `buf[pos:end]`, in order.

    A generator, checked as it goes: the attributes before a bad one are yielded first, then
    the `ValueError` (the order the Cython twin of `agent.core.nlevents` keeps too).

    Raises:
        ValueError: an attribute header is cut short, or its length is below 4 or past `end`.
    """
    while pos < end:
        if end - pos < NLA_HDRLEN:
            raise ValueError(f"truncated attribute at offset {pos}")
        size, kind = _NLA.unpack_from(buf, pos)
        if size < NLA_HDRLEN or size > end - pos:
            raise ValueError(f"bad attribute length {size} at offset {pos}")
        yield kind & NLA_TYPE_MASK, pos + NLA_HDRLEN, pos + size
        pos += (size + 3) & ~3


def _int32(fmt: struct.Struct, what: str, buf: Buffer, start: int, end: int) -> int:
    if end - start < 4:
        raise ValueError(f"short {what} attribute at offset {start}")
    value: int = fmt.unpack_from(buf, start)[0]
    return value


def u32(buf: Buffer, start: int, end: int) -> int:
    """The payload as a host-order u32 (bytes past the first four are ignored, as the kernel's
    `nla_get_u32` does).

    Raises:
        ValueError: the payload is shorter than 4 bytes.
    """
    return _int32(_U32, "u32", buf, start, end)


def s32(buf: Buffer, start: int, end: int) -> int:
    """The payload as a host-order signed 32-bit integer (see `u32`)."""
    return _int32(_S32, "s32", buf, start, end)


def be32(buf: Buffer, start: int, end: int) -> int:
    """The payload as a big-endian u32 (nf_tables attributes; see `u32`)."""
    return _int32(_BE32, "u32", buf, start, end)


def exact(buf: Buffer, start: int, end: int, size: int) -> bytes:
    """The payload, which must be `size` bytes long (an address).

    Raises:
        ValueError: it is not.
    """
    if end - start != size:
        raise ValueError(f"attribute at offset {start} has {end - start} bytes, not {size}")
    return bytes(buf[start:end])


def cstr(buf: Buffer, start: int, end: int) -> str:
    """The payload as a string: up to its first NUL (or its end), undecodable bytes replaced."""
    return bytes(buf[start:end]).split(b"\0", 1)[0].decode(errors="replace")
