"""Names on a network: the records agentd's DNS server answers for, decided here (pure).

Theory of operation. Each endpoint carries its DNS names (`Endpoint.aliases`: the name given
by `run --name`, or the namespace's name for `run`, then every `--alias`, as Docker's
`--network-alias`). A DNS-enabled network's `Table` holds, for each name (lower case, without
the trailing dot), the IPv4 and IPv6 addresses of every endpoint of *that* network carrying it
(several endpoints with one alias: several records, in the order they joined), and the reverse
names (`in-addr.arpa` / `ip6.arpa`) of those addresses, pointing at each endpoint's first name.
A name is only in its own network's table: the server looks a query up in the table of the
network whose gateway it arrived at, so other networks' names are invisible.

`lookup` says what to do with a question: answer it from the table (possibly with no record
of the asked type: NODATA), or forward it upstream (not one of ours). The wire format is the
DNS shell's business (`agent.dns`).

Also here, because they are decisions: which networks have DNS (`dns_enabled`), which names
are valid (`validate_name`), what a namespace made by `run` gets as resolv.conf
(`resolv_conf`), and the nameservers a host's resolv.conf names (`parse_resolv_conf`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

import msgspec

from agent.core.errors import InvalidArgument
from agent.core.model import Endpoint, Network

#: one label: letters, digits, '-' and '_' (Docker's container names allow '_'), 1-63 octets
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
MAX_NAME = 253  # octets of a name in text form, without the trailing dot (RFC 1035 2.3.4)
MAX_NAMES = 64  # names of one endpoint
TTL = 0  # as Docker's embedded DNS and aardvark-dns: names change as endpoints come and go


def normalise(name: str) -> str:
    """A name as tables key it: lower case (RFC 4343), without the trailing dot."""
    return name.lower().removesuffix(".")


def is_valid_name(name: str) -> bool:
    """Whether `name` is a DNS name the agent accepts (labels of [A-Za-z0-9_-], no empty
    label, at most 253 octets; one trailing dot allowed)."""
    bare = name.removesuffix(".")
    if not bare or len(bare) > MAX_NAME:
        return False
    return all(_LABEL.fullmatch(label) for label in bare.split("."))


def validate_name(name: str, field: str = "aliases") -> str:
    """`name` normalised, or InvalidArgument saying why not."""
    if not is_valid_name(name):
        raise InvalidArgument(
            f"invalid DNS name {name!r}: dot-separated labels of [A-Za-z0-9_-], 1-63 characters "
            f"each, at most {MAX_NAME} in all",
            field=field,
        )
    return normalise(name)


def endpoint_names(name: str | None, aliases: Iterable[str]) -> tuple[str, ...]:
    """An endpoint's names: `name` first (when given), then `aliases`, validated, normalised,
    each once, in the order given.

    Raises:
        InvalidArgument: an invalid name, or more than `MAX_NAMES`.
    """
    found: dict[str, None] = {}
    if name is not None:
        found[validate_name(name, "name")] = None
    for alias in aliases:
        found[validate_name(alias)] = None
    if len(found) > MAX_NAMES:
        raise InvalidArgument(f"at most {MAX_NAMES} names per endpoint", field="aliases")
    return tuple(found)


def dns_enabled(net: Network) -> bool:
    """Whether agentd answers names on `net`'s gateway: on unless turned off, never on the
    default `bridge` network (as Docker's)."""
    return net.dns and not net.is_default


class Table(msgspec.Struct, frozen=True):
    """One network's records (see the module docstring). Keys are normalised names."""

    a: dict[str, tuple[str, ...]]
    aaaa: dict[str, tuple[str, ...]]
    ptr: dict[str, str]  # normalised reverse name -> the endpoint's first name

    def has(self, name: str) -> bool:
        return name in self.a or name in self.aaaa or name in self.ptr


EMPTY = Table({}, {}, {})


def build(endpoints: Iterable[Endpoint]) -> Table:
    """The table of one network from its endpoints (reserved ones included: their addresses
    are theirs; Docker's names too exist from CreateEndpoint). Endpoints without names add
    nothing."""
    a: dict[str, list[str]] = {}
    aaaa: dict[str, list[str]] = {}
    ptr: dict[str, str] = {}
    for ep in endpoints:
        if not ep.aliases:
            continue
        for name in ep.aliases:
            key = normalise(name)
            a.setdefault(key, []).append(ep.ip)
            if ep.ip6:
                aaaa.setdefault(key, []).append(ep.ip6)
        first = normalise(ep.aliases[0])
        ptr[reverse_name(ep.ip)] = first
        if ep.ip6:
            ptr[reverse_name(ep.ip6)] = first
    return Table({k: tuple(v) for k, v in a.items()}, {k: tuple(v) for k, v in aaaa.items()}, ptr)


def reverse_name(address: str) -> str:
    """The normalised PTR name of an address (`2.0.18.172.in-addr.arpa`)."""
    return normalise(ipaddress.ip_address(address).reverse_pointer)


#: query types `lookup` knows (the numbers of RFC 1035 / 3596)
A, PTR, AAAA, ANY = 1, 12, 28, 255


class Answer(msgspec.Struct, frozen=True):
    """What to answer: `local` False means forward upstream; else `records` (possibly none:
    NODATA) of type `rtype`, each an address (A, AAAA) or a name (PTR)."""

    local: bool
    rtype: int = 0
    records: tuple[str, ...] = ()


FORWARD = Answer(False)


def lookup(table: Table, qname: str, qtype: int) -> Answer:
    """The answer to a question about `qname` (any case, with or without the trailing dot).

    A name of the table is answered here for every type (NODATA for types it has no record
    of, as an authoritative server does); every other name is forwarded.
    """
    key = normalise(qname)
    if not table.has(key):
        return FORWARD
    if qtype == A:
        return Answer(True, A, table.a.get(key, ()))
    if qtype == AAAA:
        return Answer(True, AAAA, table.aaaa.get(key, ()))
    if qtype == PTR:
        target = table.ptr.get(key)
        return Answer(True, PTR, (target,) if target is not None else ())
    return Answer(True, qtype, ())


def rotated(answer: Answer, turn: int) -> Answer:
    """`answer` with its records rotated by `turn` (round robin over several endpoints with
    one name: each asker gets every record, a different one first in turn)."""
    if len(answer.records) < 2:
        return answer
    k = turn % len(answer.records)
    return Answer(answer.local, answer.rtype, answer.records[k:] + answer.records[:k])


def resolv_conf(servers: Sequence[str]) -> str:
    """The resolv.conf of a namespace made by `run`: one `nameserver` line per server.

    Raises:
        InvalidArgument: a server that is not an IP address.
    """
    lines = []
    for server in servers:
        try:
            lines.append(f"nameserver {ipaddress.ip_address(server)}\n")
        except ValueError:
            raise InvalidArgument(f"invalid DNS server {server!r}", field="dns") from None
    return "".join(lines)


def parse_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order (bad lines skipped, as glibc
    does; a scoped IPv6 address keeps no scope)."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(words[1].partition("%")[0])))
            except ValueError:
                continue
    return found


def parse_upstream(text: str) -> tuple[str, int]:
    """`IP`, `IP:PORT` or `[IPv6]:PORT` as (address, port); port 53 by default.

    Raises:
        InvalidArgument: not an address, or a port out of range.
    """
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgument(f"invalid upstream {text!r}", field="dns_upstream")
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise InvalidArgument(f"invalid upstream address {text!r}", field="dns_upstream") from None
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"invalid upstream port in {text!r}", field="dns_upstream")
    return address, int(port)
