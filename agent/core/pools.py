"""Address pools and subnet choice, for both address families (pure).

Theory of operation, following Docker 20.10's default IPAM (observed live, see
reference/golden/docker_ipam_observations.txt):

- **Pools** are base networks split into equal subnets. The IPv4 defaults are Docker's:
  172.17.0.0/16 to 172.31.0.0/16 whole, then 192.168.0.0/16 as sixteen /20s. IPv6 networks draw
  /64s from the host's ULA /48 (`agent.core.ipam6`), as a one-pool list.
- **Subnet choice** walks the candidates in pool order, starting just after the last subnet
  allocated (round robin, wrapping), and takes the first one that overlaps neither an existing
  network nor a host route. Existing networks and routes are merged into sorted integer
  `Intervals`; a candidate that overlaps one jumps straight past it, so a /8 split into /24s
  with thousands of networks costs a few bisections, not 65,536 comparisons.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from agent.core.errors import InvalidArgument, PoolExhausted

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

#: Longest prefix a bridge network may have: a /30 still holds gateway plus one endpoint.
MAX_PREFIX_V4 = 30


def parse_network(text: str, what: str, example: str = "10.1.0.0/24") -> IPNetwork:
    """Parse a CIDR strictly; host bits set or garbage -> InvalidArgument with a hint (a
    malformed one is shown `example`)."""
    text = text.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InvalidArgument(
                f"invalid {what} {text!r}: expected a CIDR such as {example}", value=text
            ) from exc
        raise InvalidArgument(
            f"invalid {what} {text}: host bits are set; did you mean {loose}?",
            value=text,
            hint=str(loose),
        ) from exc


#: Ranges no bridge network may overlap (RFC 6890 special-purpose blocks that cannot be a
#: LAN): (block, why). IPv4: "this network", loopback, link-local, multicast, class E with the
#: limited broadcast. IPv6: the reserved ::/8 (unspecified, loopback, IPv4-mapped and
#: -compatible), deprecated site-local, link-local, multicast.
RESERVED: tuple[tuple[IPNetwork, str], ...] = (
    (IPv4Network("0.0.0.0/8"), '"this network"'),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved (incl. the broadcast address 255.255.255.255)"),
    (IPv6Network("::/8"), "reserved (unspecified, loopback, IPv4-mapped)"),
    (IPv6Network("fe80::/10"), "link-local"),
    (IPv6Network("fec0::/10"), "site-local (deprecated)"),
    (IPv6Network("ff00::/8"), "multicast"),
)


def reserved_block(net: IPNetwork) -> tuple[IPNetwork, str] | None:
    """The first reserved block (`RESERVED`) that `net` overlaps, with its name, or None."""
    for block, why in RESERVED:
        if block.version == net.version and block.overlaps(net):
            return block, why
    return None


def check_usable(net: IPNetwork, what: str = "subnet") -> IPNetwork:
    """`net` itself if a bridge network may use it; else InvalidArgument naming the block."""
    found = reserved_block(net)
    if found is not None:
        block, why = found
        raise InvalidArgument(
            f"{what} {net} is not usable for a network: it overlaps {block}, {why}",
            value=str(net),
            reserved=str(block),
        )
    return net


@dataclass(frozen=True)
class Pool:
    """A base network split into subnets of prefix length `size` (the candidates, in order)."""

    base: IPNetwork
    size: int

    def __post_init__(self) -> None:
        if not self.base.prefixlen <= self.size <= self.base.max_prefixlen:
            raise InvalidArgument(
                f"pool {self.base} cannot be split into /{self.size} subnets",
                pool=str(self.base),
                size=self.size,
            )

    @property
    def step(self) -> int:
        """Number of addresses in one candidate subnet."""
        return 1 << (self.base.max_prefixlen - self.size)

    @property
    def count(self) -> int:
        """Number of candidate subnets."""
        return 1 << (self.size - self.base.prefixlen)

    def candidate(self, k: int) -> IPNetwork:
        """The `k`-th candidate subnet of the pool."""
        start = int(self.base.network_address) + k * self.step
        return type(self.base)((start, self.size))

    def __str__(self) -> str:
        return f"{self.base}:{self.size}"


def parse_pool(text: str) -> Pool:
    """Parse `"10.200.0.0/16:24"` (base split into /24s) or `"10.200.0.0/16"` (one subnet)."""
    base_text, sep, size_text = text.strip().partition(":")
    base = parse_network(base_text, "pool")
    if not isinstance(base, IPv4Network):
        raise InvalidArgument(f"pool {text}: only IPv4 pools are supported", value=text)
    if sep and not size_text.isdigit():
        raise InvalidArgument(
            f"invalid pool {text!r}: the subnet size after ':' must be a prefix length",
            value=text,
        )
    check_usable(base, "pool")
    size = int(size_text) if sep else base.prefixlen
    if size > MAX_PREFIX_V4:
        raise InvalidArgument(
            f"invalid pool {text}: /{size} subnets are too small (at most /{MAX_PREFIX_V4})",
            value=text,
        )
    return Pool(base, size)


DEFAULT_POOLS: tuple[Pool, ...] = (
    *(Pool(IPv4Network(f"172.{n}.0.0/16"), 16) for n in range(17, 32)),
    Pool(IPv4Network("192.168.0.0/16"), 20),
)


class Taken(Protocol):
    """What subnet choice asks of the address space already taken (one IP version):
    `Intervals` built at once, or `agent.core.blocks.BlockSet` kept incrementally."""

    def overlap_end(self, lo: int, hi: int) -> int | None: ...


class Intervals:
    """Sorted, merged, inclusive integer intervals of one IP version, for overlap tests."""

    def __init__(self, networks: Iterable[IPNetwork], version: int) -> None:
        spans = sorted(
            (int(n.network_address), int(n.broadcast_address))
            for n in networks
            if n.version == version
        )
        self.starts: list[int] = []
        self.ends: list[int] = []
        for lo, hi in spans:
            if self.ends and lo <= self.ends[-1] + 1:
                self.ends[-1] = max(self.ends[-1], hi)
            else:
                self.starts.append(lo)
                self.ends.append(hi)

    def overlap_end(self, lo: int, hi: int) -> int | None:
        """End of an interval overlapping [lo, hi], or None when nothing overlaps."""
        i = bisect_right(self.starts, hi) - 1
        if i >= 0 and self.ends[i] >= lo:
            return self.ends[i]
        return None


def _first_free(pool: Pool, k: int, stop: int, taken: Taken) -> int | None:
    """First candidate index in [k, stop) of `pool` overlapping nothing in `taken`."""
    base = int(pool.base.network_address)
    step = pool.step
    while k < stop:
        lo = base + k * step
        end = taken.overlap_end(lo, lo + step - 1)
        if end is None:
            return k
        k = (end - base) // step + 1  # jump past the whole overlapping interval
    return None


def _start_after(pools: Sequence[Pool], after: IPNetwork | None) -> tuple[int, int]:
    """(pool index, candidate index) just after `after`; (0, 0) if no pool holds it."""
    if after is None:
        return 0, 0
    for p, pool in enumerate(pools):
        if after.version == pool.base.version and pool.base.overlaps(after):
            last = int(after.broadcast_address) - int(pool.base.network_address)
            return p, min(pool.count, max(0, last // pool.step + 1))
    return 0, 0


def choose_subnet(
    pools: Sequence[Pool],
    used: Sequence[IPNetwork],
    avoid: Sequence[IPNetwork],
    after: IPNetwork | None = None,
    taken: Taken | None = None,
) -> IPNetwork:
    """Pick the next free subnet, Docker style (IPv4 or IPv6: the pools' family).

    Args:
        pools: candidate pools, in order.
        used: subnets of existing networks.
        avoid: host routes (the caller leaves default routes out).
        after: the last subnet allocated; the search starts just after it and wraps.
        taken: if given, what IPv4 candidates are checked against instead of `used` and
            `avoid` (which then only serve other versions): kept incrementally by the caller.

    Raises:
        PoolExhausted: every candidate overlaps a network or a route.
    """
    if not pools:
        raise PoolExhausted("no address pools are configured")
    by_version: dict[int, Taken] = {} if taken is None else {4: taken}
    p0, k0 = _start_after(pools, after)
    order: list[tuple[int, int, int | None]]
    order = [(p, k0 if p == p0 else 0, None) for p in range(p0, len(pools))]
    order += [(p, 0, k0 if p == p0 else None) for p in range(p0 + 1)]
    for p, start, stop in order:
        pool = pools[p]
        version = pool.base.version
        if version not in by_version:
            by_version[version] = Intervals([*used, *avoid], version)
        found = _first_free(pool, start, pool.count if stop is None else stop, by_version[version])
        if found is not None:
            return pool.candidate(found)
    raise PoolExhausted(
        f"could not find an available, non-overlapping subnet in the {len(pools)} address "
        "pool(s): every candidate overlaps an existing network or a host route",
        pools=[str(p) for p in pools],
    )
