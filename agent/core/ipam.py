"""Addresses of a network: the user's subnet checked, the address allocator, MACs (pure).

Theory of operation, following Docker 20.10's default IPAM (observed live, see
reference/golden/docker_ipam_observations.txt); pools and subnet choice are in
`agent.core.pools`, IPv6 specifics in `agent.core.ipam6`:

- **Addresses** of a network are indexed by their offset in the subnet, in a range allocator
  over a bitmap (`agent.core.bitmap.RangeAllocator` or its Cython twin in `_fast.bitmap`) that
  also keeps the cursor and the counters, so a dynamic allocation is a single call. Network,
  broadcast, gateway and any extra reserved address are fixed at creation and never handed out.
  Dynamic allocation draws from the ip range (or the subnet), round robin from a cursor just
  after the last dynamic allocation, so a just-released address is not reused at once (as
  Docker's serial allocation does). Static requests may take any free host address of the
  subnet and do not move the cursor.
- Both families' allocators offer the `Allocator` protocol, so the service handles an
  endpoint's IPv4 and IPv6 addresses alike.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from agent.core.bitmap import CLAIMED, FIXED, RangeAllocator
from agent.core.errors import Conflict, InvalidArgument, NotFound, PoolExhausted
from agent.core.pools import (  # re-exported: the IPv4 pools are part of this module's API
    DEFAULT_POOLS,
    MAX_PREFIX_V4,
    IPAddress,
    IPNetwork,
    Pool,
    Taken,
    check_usable,
    choose_subnet,
    parse_network,
    parse_pool,
)

__all__ = [
    "DEFAULT_POOLS",
    "AddressAllocator",
    "Allocator",
    "Pool",
    "choose_subnet",
    "mac_for",
    "parse_pool",
    "plan_subnet",
    "validate_mac",
]


class Allocator(Protocol):
    """The addresses of one network, one family (`AddressAllocator`, `AddressAllocator6`)."""

    @property
    def subnet(self) -> IPNetwork: ...

    @property
    def cursor(self) -> int: ...

    def set_cursor(self, value: int) -> None: ...

    def allocate(self, requested: IPAddress | None = None) -> IPAddress: ...

    def reserve(self, addr: IPAddress) -> None: ...

    def release(self, addr: IPAddress) -> None: ...

    def is_allocated(self, addr: IPAddress) -> bool: ...


def _parse_address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError as exc:
        raise InvalidArgument(f"invalid {what} {text!r}: not an IP address", value=text) from exc


def _check_subnet(
    net: IPNetwork, used: Sequence[IPNetwork], used_index: Taken | None = None
) -> IPv4Network:
    if not isinstance(net, IPv4Network):
        raise InvalidArgument(f"subnet {net}: only IPv4 subnets are supported", subnet=str(net))
    if net.prefixlen > MAX_PREFIX_V4:
        raise InvalidArgument(
            f"subnet {net} is too small: the longest prefix allowed is /{MAX_PREFIX_V4}",
            subnet=str(net),
        )
    check_usable(net)
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if used_index is not None and used_index.overlap_end(lo, hi) is None:
        return net  # the index says no overlap: no need to look for which one
    for other in used:
        if other.version == net.version and other.overlaps(net):
            raise Conflict(
                f"subnet {net} overlaps the subnet {other} of an existing network",
                subnet=str(net),
                overlaps=str(other),
            )
    return net


def plan_subnet(
    *,
    subnet: str | None,
    gateway: str | None,
    ip_range: str | None,
    pools: Sequence[Pool],
    used: Sequence[IPNetwork],
    avoid: Sequence[IPNetwork],
    after: IPNetwork | None,
    taken: Taken | None = None,
    used_index: Taken | None = None,
) -> tuple[IPv4Network, IPv4Address, IPv4Network | None]:
    """Validate the user's `--subnet/--gateway/--ip-range`, or choose a subnet from the pools.

    `taken`, if given, stands for `used` and `avoid` in subnet choice (see `choose_subnet`);
    `used_index`, if given, is `used` kept as an index: a given subnet is then checked in it,
    and `used` is only scanned to name the network it overlaps.

    Returns:
        (subnet, gateway, ip_range); the gateway defaults to the first host address (.1).

    Raises:
        InvalidArgument: malformed or inconsistent input.
        Conflict: the subnet overlaps an existing network (`data['overlaps']` names it).
        PoolExhausted: no subnet given and none free in the pools.
    """
    if subnet is None:
        if gateway is not None or ip_range is not None:
            raise InvalidArgument(
                "a gateway or ip range needs an explicit subnet (--subnet)",
                gateway=gateway,
                ip_range=ip_range,
            )
        net = choose_subnet(pools, used, avoid, after, taken)
        if not isinstance(net, IPv4Network):
            raise InvalidArgument("IPv4 networks need IPv4 pools", pools=[str(p) for p in pools])
        return net, net.network_address + 1, None
    net = _check_subnet(parse_network(subnet, "subnet"), used, used_index)
    if gateway is None:
        gw = net.network_address + 1
    else:
        gw_any = _parse_address(gateway, "gateway")
        if gw_any.version != net.version or gw_any not in net:
            raise InvalidArgument(
                f"gateway {gw_any} is not inside the subnet {net}", gateway=str(gw_any)
            )
        if gw_any in (net.network_address, net.broadcast_address):
            raise InvalidArgument(
                f"gateway {gw_any} is the network or broadcast address of {net}",
                gateway=str(gw_any),
            )
        gw = IPv4Address(int(gw_any))
    rng: IPv4Network | None = None
    if ip_range is not None:
        rng_any = parse_network(ip_range, "ip range")
        check_usable(rng_any, "ip range")
        if rng_any.version != net.version or not rng_any.subnet_of(net):
            raise InvalidArgument(
                f"ip range {rng_any} is not inside the subnet {net}", ip_range=str(rng_any)
            )
        rng = IPv4Network(rng_any)
    return net, gw, rng


class AddressAllocator:
    """The addresses of one network, indexed by offset in the subnet.

    Network, broadcast, gateway and `reserved` addresses are never handed out. Dynamic
    allocation draws from `ip_range` (or the whole subnet) round robin; static requests may use
    any free host address of the subnet. The integer work (bitmap, range, cursor, counters) is
    done by a `RangeAllocator` (`agent.core.bitmap` or its Cython twin `_fast.bitmap`); this
    class converts addresses to offsets and results to errors.
    """

    def __init__(
        self,
        subnet: IPv4Network,
        gateway: IPv4Address,
        ip_range: IPv4Network | None = None,
        reserved: Iterable[IPv4Address] = (),
        range_allocator: Callable[[int, int, int, Iterable[int]], RangeAllocator] = (
            RangeAllocator
        ),
    ) -> None:
        """Set up the offsets of `subnet`, with the addresses never handed out fixed.

        Args:
            subnet: the network's subnet; one offset per address of it.
            gateway: the bridge's address, never handed out.
            ip_range: where dynamic allocation draws from (default: the whole subnet).
            reserved: further addresses never handed out.
            range_allocator: `agent.core.bitmap.RangeAllocator` or `_fast.bitmap.RangeAllocator`
                (any callable taking `(size, lo, hi, fixed)` and returning such an allocator).

        Raises:
            InvalidArgument: gateway, ip range or a reserved address outside the subnet.
        """
        if gateway.version != 4 or gateway not in subnet:
            raise InvalidArgument(f"gateway {gateway} is not inside the subnet {subnet}")
        if ip_range is not None and not ip_range.subnet_of(subnet):
            raise InvalidArgument(f"ip range {ip_range} is not inside the subnet {subnet}")
        self.subnet = subnet
        self.gateway = gateway
        self.ip_range = ip_range
        self._base = int(subnet.network_address)
        self._size = subnet.num_addresses
        rng = ip_range or subnet
        lo = int(rng.network_address) - self._base
        hi = int(rng.broadcast_address) - self._base + 1
        fixed = {0, self._size - 1, self._offset(gateway)}
        for addr in reserved:
            if self._offset(addr) < 0:
                raise InvalidArgument(f"reserved address {addr} is not inside the subnet {subnet}")
            fixed.add(self._offset(addr))
        self._core = range_allocator(self._size, lo, hi, sorted(fixed))
        self._next = self._core.allocate  # bound once: the dynamic path is one C call

    def _offset(self, addr: IPAddress) -> int:
        """Index of `addr` in the subnet, or -1 outside it (integer arithmetic: hot path)."""
        if addr.version != 4:
            return -1
        i = int(addr) - self._base
        return i if 0 <= i < self._size else -1

    @property
    def cursor(self) -> int:
        """Offset in the subnet where the next dynamic search starts."""
        return self._core.cursor

    def set_cursor(self, value: int) -> None:
        """Restore a persisted cursor; a value at the end of the range wraps to its start.

        Raises:
            InvalidArgument: `value` lies outside the dynamic range.
        """
        try:
            self._core.set_cursor(value)
        except ValueError as exc:
            raise InvalidArgument(str(exc), cursor=value) from None

    @property
    def used(self) -> int:
        """Addresses of the dynamic range currently allocated."""
        return self._core.used

    @property
    def free(self) -> int:
        """Addresses of the dynamic range still available."""
        return self._core.free

    def is_allocated(self, addr: IPAddress) -> bool:
        """Whether `addr` was handed out (network, broadcast, gateway and reserved are not)."""
        i = self._offset(addr)
        return i >= 0 and self._core.is_allocated(i)

    def allocate(self, requested: IPAddress | None = None) -> IPv4Address:
        """Hand out `requested`, or the next free address of the dynamic range.

        Raises:
            InvalidArgument: `requested` is outside the subnet or reserved.
            Conflict: `requested` is already in use.
            PoolExhausted: no dynamic address is free.
        """
        if requested is not None:
            return self._take(requested)
        i = self._next()
        if i < 0:
            where = f"ip range {self.ip_range}" if self.ip_range else f"subnet {self.subnet}"
            raise PoolExhausted(
                f"no free address left in the {where} of this network", subnet=str(self.subnet)
            )
        return IPv4Address(self._base + i)

    def _take(self, addr: IPAddress) -> IPv4Address:
        i = self._offset(addr)
        if i < 0:
            raise InvalidArgument(
                f"address {addr} is not inside the subnet {self.subnet} of this network",
                address=str(addr),
            )
        got = self._core.claim(i)
        if got == FIXED:
            raise InvalidArgument(
                f"address {addr} is reserved on this network (network, broadcast, gateway "
                "or a reserved address)",
                address=str(addr),
            )
        if got != CLAIMED:
            raise Conflict(f"address {addr} is already in use on this network", address=str(addr))
        return IPv4Address(self._base + i)

    def reserve(self, addr: IPAddress) -> None:
        """Adopt an address already in use (after a restart); does not move the cursor.

        Raises:
            InvalidArgument: outside the subnet or reserved. Conflict: already taken.
        """
        self._take(addr)

    def release(self, addr: IPAddress) -> None:
        """Return `addr` to the free addresses.

        Raises:
            NotFound: `addr` is not allocated on this network.
        """
        i = self._offset(addr)
        if i < 0 or not self._core.release(i):
            raise NotFound(f"address {addr} is not allocated on this network", address=str(addr))


def mac_for(ip: IPv4Address) -> str:
    """Docker's container MAC: `02:42:` + the IPv4 bytes (172.18.0.2 -> 02:42:ac:12:00:02)."""
    return "02:42:" + ":".join(f"{b:02x}" for b in IPv4Address(ip).packed)


_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}$")


def validate_mac(text: str) -> str:
    """Canonical lowercase `aa:bb:cc:dd:ee:ff` form of a unicast, non-zero MAC address.

    Raises:
        InvalidArgument: malformed, multicast (lowest bit of the first octet) or all zeros.
    """
    text = text.strip()
    if not _MAC_RE.fullmatch(text):
        raise InvalidArgument(
            f"invalid MAC address {text!r}: expected six hex octets like 02:42:ac:11:00:02",
            mac=text,
        )
    octets = [int(x, 16) for x in re.split(r"[:-]", text)]
    if octets[0] & 1:
        raise InvalidArgument(f"MAC address {text} is a multicast address", mac=text)
    if not any(octets):
        raise InvalidArgument("MAC address 00:00:00:00:00:00 is not a valid address", mac=text)
    return ":".join(f"{b:02x}" for b in octets)
