"""The DNS wire format, through dnslib: queries read, answers written (no I/O).

dnslib, not dnspython: for this server's path (parse a query, build the reply with one A
record, pack it) dnslib took ~52-80 us and dnspython ~195-465 us on this machine (median of
20,000 calls each, `bench/bench_dns.py --library`). Whatever is answered from the table goes
through here once; repeats of a query come from the server's answer cache
(`agent.dns.server`), so the library is off the hot path.

Error handling: `parse` raises `WireError` for anything that is not a DNS message dnslib can
read (its parser raises several exception types on garbage); nothing else escapes.
"""

from __future__ import annotations

from typing import Any

import dnslib

from agent.core import names

HEADER = 12  # octets of a DNS header
UDP_PLAIN = 512  # the most a UDP answer may carry without EDNS (RFC 1035 4.2.1)
UDP_MAX = 1232  # the most this server sends over UDP, EDNS or not (DNS flag day 2020)
QUERY, NOERROR, FORMERR, SERVFAIL, NOTIMP, REFUSED = 0, 0, 1, 2, 4, 5


class WireError(Exception):
    """Not a DNS message this server can read."""


def looks_like_query(data: bytes) -> bool:
    """At least a header, and the QR bit clear (a response is never answered: no loops)."""
    return len(data) >= HEADER and not data[2] & 0x80


def parse(data: bytes) -> Any:
    """The dnslib `DNSRecord` of `data`.

    Raises:
        WireError: garbage (dnslib raises DNSError, struct or index errors, Unicode errors...).
    """
    try:
        return dnslib.DNSRecord.parse(data)
    except Exception as exc:  # dnslib's parser has no single error type; see the docstring
        raise WireError(f"unreadable DNS message: {exc}") from exc


def question(query: Any) -> tuple[str, int] | None:
    """(name, type) of a standard query with one question; None for anything else."""
    if query.header.opcode != QUERY or len(query.questions) != 1 or query.header.qr:
        return None
    q = query.questions[0]
    return str(q.qname), int(q.qtype)


def udp_limit(query: Any) -> int:
    """The largest UDP answer `query`'s sender takes: 512, or its EDNS size up to 1232."""
    for rr in query.ar:
        if rr.rtype == dnslib.QTYPE.OPT:
            return max(UDP_PLAIN, min(int(rr.rclass), UDP_MAX))
    return UDP_PLAIN


def _reply(query: Any, rcode: int = NOERROR, *, tc: bool = False) -> Any:
    header = dnslib.DNSHeader(
        id=query.header.id, qr=1, aa=1, ra=1, rd=query.header.rd, opcode=query.header.opcode,
        rcode=rcode, tc=int(tc),
    )  # fmt: skip
    reply = dnslib.DNSRecord(header, q=query.q if query.questions else None)
    if any(rr.rtype == dnslib.QTYPE.OPT for rr in query.ar):
        reply.add_ar(dnslib.EDNS0(udp_len=UDP_MAX))
    return reply


_RDATA = {
    names.A: dnslib.A,
    names.AAAA: dnslib.AAAA,
    names.PTR: lambda target: dnslib.PTR(target + "."),
}


def answer(query: Any, found: names.Answer) -> bytes:
    """The authoritative answer to `query` from the table (`found.local`): its records, or
    none (NODATA)."""
    reply = _reply(query)
    make = _RDATA.get(found.rtype)
    if make is not None:
        for record in found.records:
            reply.add_answer(
                dnslib.RR(query.q.qname, found.rtype, rdata=make(record), ttl=names.TTL)
            )
    return bytes(reply.pack())


def error(query: Any, rcode: int) -> bytes:
    """An answer with no records and `rcode` (SERVFAIL, FORMERR, NOTIMP, REFUSED)."""
    return bytes(_reply(query, rcode).pack())


def truncated(query: Any) -> bytes:
    """The answer saying "too large for UDP, ask over TCP": TC set, the question only."""
    return bytes(_reply(query, tc=True).pack())


def is_truncated(data: bytes) -> bool:
    """Whether a (response) message has the TC bit."""
    return len(data) >= HEADER and bool(data[2] & 0x02)


def same_id(query: bytes, response: bytes) -> bool:
    """Whether `response` is a response with `query`'s id."""
    return len(response) >= HEADER and response[:2] == query[:2] and bool(response[2] & 0x80)
