"""What the service needs from the kernel shell: the `Kernel` and `Namespaces` protocols.

`agent.kernel.client.Kernel` (netlink through the kernel worker) and
`agent.kernel.netns` implement them; the service, adoption and the reconciler use nothing
else, and tests hold their fakes to these protocols (tests/core/test_fakes.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Protocol

import msgspec

from agent.core.attach import Attachment, Bridge


class LinkInfo(msgspec.Struct, frozen=True):
    """A link of the host namespace that carries this agent's alias or link group."""

    index: int
    name: str
    kind: str | None
    alias: str
    master: int
    up: bool
    addresses: tuple[str, ...]  # "address/prefix", IPv4 and IPv6
    group: int = 0


class Kernel(Protocol):
    """Links, addresses and routes of the host namespace and of the namespaces it attaches.

    Every method is one job of the kernel worker: atomic with respect to cancellation, all or
    nothing. Errors are `AgentError`s: NotFound, Conflict, InvalidArgument, else KernelError.
    """

    async def ensure_bridge(self, bridge: Bridge) -> int:
        """Create `bridge` (down, in the agent's link group, with its alias and addresses) or
        adopt it; returns its ifindex. Conflict if the name is a link of another kind."""
        ...

    async def delete_bridge(self, bridge: Bridge, *, retire: bool = False) -> bool:
        """Delete the agent's bridge (False if absent); a user's bridge only loses
        `bridge.address`/`address6`. With `retire`, only move it to the dying group."""
        ...

    async def attach(self, att: Attachment) -> bool:
        """Join the namespace to the bridge by a veth pair; False when the namespace has IPv6
        disabled (the endpoint then has IPv4 only). On failure nothing is left."""
        ...

    async def attach_host(self, att: Attachment) -> bool:
        """The veth pair with both ends in the host namespace, the host end a port of the
        bridge, the peer (`att.ifname`) left for an engine to move (Docker's Join). True."""
        ...

    async def detach(self, host_ifname: str) -> bool:
        """Delete a veth now (its peer goes with it); False if it was gone."""
        ...

    async def retire(self, host_ifname: str) -> bool:
        """Cut a veth off at once (down, out of its bridge, dying group) for `reap`."""
        ...

    async def reap(self, bridges: Sequence[Bridge] = ()) -> bool:
        """Retire `bridges`, then delete every retired link in one message."""
        ...

    async def enslave(self, host_ifname: str, bridge: str) -> None:
        """Make `host_ifname` an up port of `bridge`, and the bridge up."""
        ...

    async def set_alias(self, name: str, alias: str) -> None:
        """Rewrite the ownership mark (`agent.core.marks`) of our link `name`."""
        ...

    async def link_state(self, name: str) -> tuple[bool, int] | None:
        """(up, master ifindex) of link `name` now; None if it does not exist."""
        ...

    async def owned_links(self) -> list[LinkInfo]:
        """The host links in the agent's link group or carrying its alias (one dump)."""
        ...

    async def host_routes(self) -> list[ipaddress.IPv4Network]:
        """Every non-default IPv4 route of the main table."""
        ...

    async def route_changes(self) -> tuple[str, list[str], list[str]]:
        """The host's non-default main-table IPv4 routes as changes since the last call:
        ("full", routes, []) or ("delta", added, removed), one entry per route."""
        ...

    async def addresses_in(self, netns_path: str, ifname: str) -> list[str] | None:
        """The addresses ("address/prefix", both families) of `ifname` inside the namespace
        at `netns_path`; None when it has no such link. NotFound if the namespace is gone."""
        ...

    async def set_ip_forward(self) -> None: ...

    async def set_ip6_forward(self) -> None: ...


class Namespaces(Protocol):
    """Network namespace files: resolving, identifying, creating and deleting named ones."""

    def resolve(self, netns: str) -> str:
        """A bare name becomes /run/netns/NAME (validated); an absolute path is kept."""
        ...

    def netns_key(self, path: str) -> str:
        """ "dev:inode" of the namespace at `path`; NotFound / InvalidArgument otherwise."""
        ...

    async def create_named(self, name: str) -> str:
        """Create /run/netns/NAME (like `ip netns add`); returns its path."""
        ...

    async def delete_named(self, name: str) -> bool:
        """Remove /run/netns/NAME (like `ip netns delete`); False if it did not exist."""
        ...

    def write_resolv_conf(self, name: str, text: str) -> None:
        """Write /etc/netns/NAME/resolv.conf (what `ip netns exec NAME` shows as
        /etc/resolv.conf)."""
        ...

    def remove_resolv_conf(self, name: str) -> None:
        """Remove /etc/netns/NAME/resolv.conf (and the folder if empty); no error if absent."""
        ...
