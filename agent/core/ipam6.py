"""IPv6 address management: the host's ULA /48, subnet choice, a sequential allocator.

Theory of operation (the IPv6 half of `agent.core.ipam`, split off to keep both modules short):

- **ULA /48**: each host draws one RFC 4193 prefix, `fd` + 40 random bits, once; the service
  persists it (store meta `ula48`) so it survives restarts. The randomness is passed in (this
  module is pure).
- **Subnet choice**: without `--subnet` for IPv6, a network gets the first /64 of the /48 (in
  order: `fdXX:XXXX:XXXX::/64`, `fdXX:XXXX:XXXX:1::/64`, ...) that overlaps no existing IPv6
  network. A given subnet must be a strict IPv6 CIDR of prefix length 16..120 (a /120 still
  holds 254 endpoints; shorter than /16 is surely a typo) overlapping no other network.
- **Addresses**: a /64 cannot be a bitmap, so, like Docker, allocation is sequential: a cursor
  (offset in the subnet) and the set of offsets in use. The gateway defaults to `::1`, endpoints
  get `::2`, `::3`, ...; a released address is not reused before the cursor wraps. Offset 0 (the
  subnet-router anycast address) is never handed out. Static requests may take any free
  offset and do not move the cursor. Each step costs O(1 + addresses skipped).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv6Address, IPv6Network

from agent.core.errors import Conflict, InvalidArgument, NotFound, PoolExhausted
from agent.core.pools import IPAddress, Pool, check_usable, choose_subnet, parse_network

#: Longest IPv6 prefix a network may have; /120 = 256 addresses.
MAX_PREFIX_V6 = 120
#: Shortest IPv6 prefix accepted for a network.
MIN_PREFIX_V6 = 16
#: Size of the subnets chosen from the host's ULA /48.
ULA_SUBNET_PREFIX = 64


def ula48(random40: int) -> IPv6Network:
    """The RFC 4193 prefix `fd` + 40 bits of `random40` (the caller draws them)."""
    if not 0 <= random40 < 1 << 40:
        raise ValueError("random40 must be a 40-bit integer")
    return IPv6Network(((0xFD << 120) | (random40 << 80), 48))


def parse_subnet6(text: str) -> IPv6Network:
    """Parse an IPv6 CIDR strictly; InvalidArgument (with a hint) when it is not one."""
    net = parse_network(text, "IPv6 subnet", "fd00:1::/64")
    if not isinstance(net, IPv6Network):
        raise InvalidArgument(f"subnet {net} is not an IPv6 subnet", subnet=str(net))
    if not MIN_PREFIX_V6 <= net.prefixlen <= MAX_PREFIX_V6:
        raise InvalidArgument(
            f"IPv6 subnet {net}: the prefix length must be between /{MIN_PREFIX_V6} and "
            f"/{MAX_PREFIX_V6}",
            subnet=str(net),
        )
    return IPv6Network(check_usable(net, "IPv6 subnet"))


def choose_subnet6(base: IPv6Network, used: Iterable[IPv6Network]) -> IPv6Network:
    """The first /64 of `base` overlapping nothing in `used` (`pools.choose_subnet` over a
    one-pool list).

    Raises:
        PoolExhausted: every /64 of `base` overlaps a network.
    """
    found = choose_subnet([Pool(base, ULA_SUBNET_PREFIX)], list(used), [])
    assert isinstance(found, IPv6Network)
    return found


def plan_subnet6(
    *,
    subnet: str | None,
    gateway: str | None,
    base: IPv6Network,
    used: Sequence[IPv6Network],
) -> tuple[IPv6Network, IPv6Address]:
    """Validate `--subnet V6 [--gateway V6]`, or choose a /64 from `base`; gateway `::1`.

    Raises:
        InvalidArgument: malformed input, or a gateway without a subnet / outside it.
        Conflict: the subnet overlaps an existing IPv6 network.
        PoolExhausted: no subnet given and none free in `base`.
    """
    if subnet is None:
        if gateway is not None:
            raise InvalidArgument("an IPv6 gateway needs an explicit IPv6 subnet", gateway=gateway)
        net = choose_subnet6(base, used)
        return net, net.network_address + 1
    net = parse_subnet6(subnet)
    for other in used:
        if other.overlaps(net):
            raise Conflict(
                f"subnet {net} overlaps the subnet {other} of an existing network",
                subnet=str(net),
                overlaps=str(other),
            )
    if gateway is None:
        return net, net.network_address + 1
    gw = parse_address6(gateway, "IPv6 gateway")
    if gw not in net or gw == net.network_address:
        raise InvalidArgument(f"IPv6 gateway {gw} is not a host address of {net}", gateway=str(gw))
    return net, gw


def parse_address6(text: str, what: str = "IPv6 address") -> IPv6Address:
    """A canonical IPv6 address, or InvalidArgument naming `what`."""
    try:
        return IPv6Address(text.strip())
    except ValueError as exc:
        raise InvalidArgument(f"invalid {what} {text!r}", value=text) from exc


class AddressAllocator6:
    """The IPv6 addresses of one network: a cursor and the set of offsets in use."""

    def __init__(
        self, subnet: IPv6Network, gateway: IPv6Address, reserved: Iterable[IPv6Address] = ()
    ) -> None:
        """Raises InvalidArgument when the gateway or a reserved address is outside `subnet`."""
        self.subnet = subnet
        self.gateway = gateway
        self._base = int(subnet.network_address)
        self._size = subnet.num_addresses
        fixed = {0}
        for addr in (gateway, *reserved):
            i = self._offset(addr)
            if i < 0:
                raise InvalidArgument(f"address {addr} is not inside the subnet {subnet}")
            fixed.add(i)
        self._fixed = frozenset(fixed)
        self._used: set[int] = set()
        self._capacity = self._size - len(fixed)
        self._cursor = 1

    def _offset(self, addr: IPAddress) -> int:
        if addr.version != 6:
            return -1
        i = int(addr) - self._base
        return i if 0 <= i < self._size else -1

    @property
    def cursor(self) -> int:
        """Offset where the next dynamic search starts."""
        return self._cursor

    def set_cursor(self, value: int) -> None:
        """Restore a persisted cursor (wrapped into the subnet)."""
        self._cursor = value if 1 <= value < self._size else 1

    @property
    def used(self) -> int:
        return len(self._used)

    def allocate(self, requested: IPAddress | None = None) -> IPv6Address:
        """Hand out `requested`, or the next free address after the cursor (wrapping).

        Raises:
            InvalidArgument: `requested` outside the subnet or reserved. Conflict: in use.
            PoolExhausted: every address is taken.
        """
        if requested is not None:
            return self._take(requested)
        if len(self._used) >= self._capacity:
            raise PoolExhausted(
                f"no free address left in the IPv6 subnet {self.subnet} of this network",
                subnet=str(self.subnet),
            )
        i = self._cursor
        while i in self._used or i in self._fixed:
            i = i + 1 if i + 1 < self._size else 1
        self._used.add(i)
        self._cursor = i + 1 if i + 1 < self._size else 1
        return IPv6Address(self._base + i)

    def _take(self, addr: IPAddress) -> IPv6Address:
        i = self._offset(addr)
        if i < 0:
            raise InvalidArgument(
                f"address {addr} is not inside the IPv6 subnet {self.subnet} of this network",
                address=str(addr),
            )
        if i in self._fixed:
            raise InvalidArgument(
                f"address {addr} is reserved on this network (subnet-router anycast or gateway)",
                address=str(addr),
            )
        if i in self._used:
            raise Conflict(f"address {addr} is already in use on this network", address=str(addr))
        self._used.add(i)
        return IPv6Address(self._base + i)

    def reserve(self, addr: IPAddress) -> None:
        """Adopt an address already in use (after a restart); does not move the cursor."""
        self._take(addr)

    def is_allocated(self, addr: IPAddress) -> bool:
        return self._offset(addr) in self._used

    def release(self, addr: IPAddress) -> None:
        """Return `addr`. Raises NotFound when it is not allocated."""
        i = self._offset(addr)
        if i not in self._used:
            raise NotFound(f"address {addr} is not allocated on this network", address=str(addr))
        self._used.discard(i)
