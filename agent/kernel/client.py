"""The kernel shell as agentd sees it: `Kernel`, whose every method is one job of the worker.

Theory of operation: the netlink work runs in a child process (`agent.kernel.worker`, see its
docstring for why), in its owner thread or, for batch deletes, its reaper thread. This `Kernel`
implements `agent.kernel.base.Kernel` by sending each call as a job (`agent.kernel.jobs`)
through the `agent.kernel.connection.WorkerConnection` and awaiting the answer: a job is atomic
with respect to cancellation (a whole attach, or its rollback, runs to completion), and errors
come back as the `AgentError` the worker raised. `Bridge` and `Attachment` validated themselves
when they were made, so they are sent as they are, as plain tuples of their fields (see
`agent.kernel.jobs`); names given as strings are checked here, before any kernel work.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from msgspec.structs import astuple

from agent.core import naming
from agent.core.attach import Attachment, Bridge
from agent.core.errors import InvalidArgument, KernelError
from agent.kernel import routewatch
from agent.kernel.base import LinkInfo
from agent.kernel.connection import WorkerConnection, start
from agent.kernel.jobs import Job


class Kernel:
    """Links, addresses and routes of the host namespace and of the namespaces it attaches
    (`agent.kernel.base.Kernel`), through the kernel worker.

    Resource handling:
        Made by `open_kernel`, which owns the worker process, its threads and sockets.

    Error handling:
        NotFound, Conflict, InvalidArgument as each method says; anything else KernelError,
        also when the worker is gone.
    """

    def __init__(self, conn: WorkerConnection) -> None:
        self._conn = conn
        self._routes = routewatch.RouteWatch()  # in agentd: see `agent.kernel.routewatch`

    async def _call(self, job: Job, *args: Any) -> Any:
        """One job; a low-level error that escaped mapping becomes KernelError."""
        try:
            return await self._conn.call(job, args)
        except OSError as exc:
            raise KernelError(f"{job}: {exc}") from exc

    async def ensure_bridge(self, bridge: Bridge) -> int:
        """Create `bridge` (down, group LINK_GROUP, its alias) or adopt it; returns ifindex.

        An adopted bridge keeps a foreign alias (only an alias of ours is rewritten).
        `bridge.address` is added unless present; so is `bridge.address6` (no DAD).

        Error handling:
            Conflict if the name is a link of another kind.
        """
        return await self._call(Job.ENSURE_BRIDGE, astuple(bridge))

    async def delete_bridge(self, bridge: Bridge, *, retire: bool = False) -> bool:
        """Delete `bridge`; False if it did not exist; Conflict if it is not a bridge.

        A bridge without our ownership alias or link group was the user's: it is kept (False)
        and only `bridge.address`/`address6` (the gateways we added) are removed from it. With
        `retire`, our bridge is only moved to the dying link group, to be deleted by the next
        `reap` batch (a bridge delete waits ~30 ms for the kernel).
        """
        return await self._call(Job.DELETE_BRIDGE, astuple(bridge), retire)

    async def attach(self, att: Attachment) -> bool:
        """Connect the namespace at `att.netns` to `att.bridge` by a veth pair; all or nothing.

        Returns False when `att.address6` was given but the namespace has IPv6 disabled: the
        endpoint is connected with IPv4 only.

        Error handling:
            NotFound (namespace or bridge missing), Conflict (`host_ifname` exists, or `ifname`
            is taken inside the namespace: the message says which), InvalidArgument (not a
            network namespace), else KernelError. On any failure the veth (and so its peer)
            is deleted.
        """
        return await self._call(Job.ATTACH, astuple(att))

    async def attach_host(self, att: Attachment) -> bool:
        """Make the veth pair with both ends in the host namespace (`att.host_ifname` a port
        of `att.bridge`, up; `att.ifname` down, with `att.mac`), for an engine that moves the
        peer into its container itself (Docker's Join); all or nothing. Returns True.

        Error handling: as `attach` (Conflict names the end that exists).
        """
        return await self._call(Job.ATTACH_HOST, astuple(att))

    async def detach(self, host_ifname: str) -> bool:
        """Delete the veth (its peer goes with it); False if it was already gone."""
        return await self._call(Job.DETACH, naming.validate_ifname(host_ifname))

    async def retire(self, host_ifname: str) -> bool:
        """Cut a veth off at once (down, out of its bridge, into the dying link group) for
        `reap` to delete later with others; False if it was already gone. ~0.1 ms, where a
        delete waits 15-20 ms for the kernel (RCU)."""
        return await self._call(Job.RETIRE, naming.validate_ifname(host_ifname))

    async def reap(self, bridges: Sequence[Bridge] = ()) -> bool:
        """Delete every retired link in one message (one RCU wait for all), in the reaper
        thread; False if there was none.

        `bridges` of removed networks are retired first, in the same job, as
        `delete_bridge(..., retire=True)` does: a user's bridge only loses our addresses. This
        keeps `network rm` off the netlink lock, which a batch delete in progress holds for
        tens of milliseconds.

        Error handling:
            A name that is no longer a bridge is skipped (logged); KernelError otherwise.
        """
        return await self._call(Job.REAP, tuple(astuple(b) for b in bridges))

    async def enslave(self, host_ifname: str, bridge: str) -> None:
        """Make `host_ifname` an up port of `bridge` and the bridge up (repair after the
        bridge was recreated: deleting a bridge releases its ports)."""
        await self._call(
            Job.ENSLAVE, naming.validate_ifname(host_ifname), naming.validate_ifname(bridge)
        )

    async def set_alias(self, name: str, alias: str) -> None:
        """Rewrite the ownership mark of our link `name` (an endpoint's ports changed)."""
        if len(alias.encode()) > 255:
            raise InvalidArgument(f"alias of {name} longer than 255 bytes", field="alias")
        await self._call(Job.SET_ALIAS, naming.validate_ifname(name), alias)

    async def link_state(self, name: str) -> tuple[bool, int] | None:
        """(up, master ifindex) of link `name` now, or None if it does not exist (one lean
        RTM_GETLINK: to check a possibly stale event before repairing)."""
        return await self._call(Job.LINK_STATE, naming.validate_ifname(name))

    async def owned_links(self) -> list[LinkInfo]:
        """Host links in the agent's link group or with its alias (for adoption)."""
        return await self._call(Job.OWNED_LINKS)

    async def host_routes(self) -> list[ipaddress.IPv4Network]:
        """Every non-default IPv4 route of the main table (the caller filters)."""
        return await self._call(Job.HOST_ROUTES)

    async def route_changes(self) -> tuple[str, list[str], list[str]]:
        """The host's routes as changes: ("full", routes, []) the first time (and after lost
        notifications), then ("delta", added, removed) (see `agent.kernel.routewatch`)."""
        try:
            return self._routes.pending()  # no I/O but a non-blocking read: no worker job
        except routewatch.Lost:
            return await trio.to_thread.run_sync(self._routes.dump)

    async def ifnames_in(self, netns_path: str) -> set[str]:
        """Names of the links inside the namespace at `netns_path` (not in the protocol: for
        tests and diagnostics)."""
        return await self._call(Job.IFNAMES_IN, netns_path)

    async def addresses_in(self, netns_path: str, ifname: str) -> list[str] | None:
        """The addresses ("address/prefix") of `ifname` in the namespace at `netns_path`;
        None when it has no such link (CNI's CHECK)."""
        return await self._call(Job.ADDRESSES_IN, netns_path, naming.validate_ifname(ifname))

    async def set_ip_forward(self) -> None:
        """Enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward = 1)."""
        await self._call(Job.SET_IP_FORWARD)

    async def set_ip6_forward(self) -> None:
        """Enable IPv6 forwarding (net.ipv6.conf.all.forwarding = 1). Note: interfaces then
        ignore router advertisements unless their accept_ra is 2 (as with Docker)."""
        await self._call(Job.SET_IP6_FORWARD)


@asynccontextmanager
async def open_kernel(log_level: str = "info", log_format: str = "json") -> AsyncIterator[Kernel]:
    """Start the kernel worker (`agent.kernel.worker`: the owner and reaper threads, in a child
    process) and open its netlink sockets; close them and stop it on exit.

    Error handling:
        If the worker dies meanwhile, KernelError ends the block (and every call in flight).
    """
    conn = await start(log_level, log_format)
    kernel = Kernel(conn)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve)
        try:
            await kernel._call(Job.OPEN)
            await kernel._call(Job.OPEN_REAPER)
            yield kernel
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(KernelError):
                await kernel._call(Job.CLOSE_REAPER)
                await kernel._call(Job.CLOSE)
            await conn.stop()  # ends `serve`, and with it the nursery
            kernel._routes.close()
