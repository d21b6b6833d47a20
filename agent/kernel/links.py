"""Bridges and veth endpoints through netlink, driven from Trio by one owner thread.

Theory of operation (DESIGN sections 3-4):
- Every kernel step is a job of the owner thread, so it is atomic with respect to
  cancellation: a whole `attach` (create, configure, or roll back) is ONE job. The owner and
  reaper threads live in a child process (`agent.kernel.worker`), away from the Trio thread's
  GIL: agentd's `Kernel` validates a request and sends the job; the worker's `Kernel` runs
  the owner-side method of that name.
- Every message is built by `agent.kernel.rtnl` (lean, `struct`-based) and ifindexes are kept
  instead of looked up (pyroute2's `get`/`link_lookup` are slow and leak ~1.6 KB a call); dumps
  are decoded by the same decoder as the event stream (`agent.accel.nlevents`).
- The veth is created in one message with its peer born inside the target namespace, named,
  with its MAC, MTU and one queue per end, the host end enslaved and down (no udev MAC race).
  The host end gets its alias and hairpin mode, then `disable_ipv6`, while still down, then comes
  up: every notification about the host end costs the kernel a linear scan of the host's
  namespace ids (`__peernet2id`, one id per container namespace), and changes to a down link
  send none, so an attach makes five. A disconnect only retires a veth (`retire`); `reap`, in
  a second thread with its own socket, deletes every retired link at once (see
  `agent.reaper`). The in-namespace steps use a socket the owner thread opens there, stepping
  into the namespace for the `socket()` call only (`netns.socket_visiting`); the create's echo
  names the peer's ifindex, so they are one datagram.
- Namespace ids count down: the kernel finds the id of a veth peer's namespace (for every
  notification about the host end) by scanning the host's ids in ascending order, one per
  container namespace, and gives a new namespace the lowest free one, so an attach among
  10,000 endpoints scanned them all, five times. `_nsid_claim` gives each namespace, with its
  first veth, an id below every earlier one (RTM_NEWNSID): an attach finds its own first.
  A detach scans past the namespaces attached after it and still there.
- Ownership is visible in the kernel: IFLA_IFALIAS (`naming.veth_alias/bridge_alias`; the kernel
  ignores it in a create, so it is a second message) and link group `naming.LINK_GROUP`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from agent import accel
from agent.core import naming
from agent.core.errors import AgentError, Conflict, InvalidArgument, KernelError, NotFound
from agent.kernel import netns, rtnl, worker
from agent.kernel.rtnl import NetlinkError, check
from agent.log import get_logger

log = get_logger("agent.kernel")

_STALE_MASTER = (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP)
#: Namespace ids the agent gives out, counting down (see the module docstring); the kernel's
#: own ids count up from 0 and never get near.
NSID_TOP, NSID_FLOOR = 1 << 30, 1 << 29


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


def _map(exc: NetlinkError, what: str, **data: Any) -> AgentError:
    """EEXIST -> Conflict, ENODEV -> NotFound, anything else -> KernelError."""
    text = f"{what}: {exc.strerror}"
    if exc.errno == errno.EEXIST:
        return Conflict(text, errno=exc.errno, **data)
    if exc.errno == errno.ENODEV:
        return NotFound(text, errno=exc.errno, **data)
    return KernelError(text, errno=exc.errno, **data)


def _step(result: list[bytes] | NetlinkError, what: str, data: dict[str, Any]) -> list[bytes]:
    """The replies of one step, or its error mapped with a message naming the step."""
    if isinstance(result, NetlinkError):
        raise _map(result, f"cannot {what}", **data) from result
    return result


class _Endpoint(msgspec.Struct, frozen=True):
    """A validated attach request (checked in the Trio task, before any kernel work)."""

    netns_path: str
    bridge: str
    host_ifname: str
    alias: str
    ifname: str
    mac: str
    mtu: int
    address: str
    gateway: str | None
    address6: str | None = None
    gateway6: str | None = None


class Kernel:
    """The kernel shell: every method runs as one job of the owner thread.

    One class, two processes: in agentd, the public (Trio-side) methods send jobs through
    `owner`/`reaper`; in the worker, the owner-side methods (`_attach`, ...) run them, with
    the sockets and caches.

    Resource handling:
        Made by `open_kernel`, which owns the worker process, its threads and sockets.
    """

    def __init__(self, owner: worker.JobRunner, reaper: worker.JobRunner) -> None:
        self._owner = owner
        self._reaper = reaper  # its own thread and socket: a batch delete never delays an attach
        self._rt: rtnl.RtSocket | None = None
        self._home = -1  # the owner thread's own namespace, to come back to (socket_visiting)
        self._reap_rt: rtnl.RtSocket | None = None
        self._bridges: dict[str, int] = {}
        self._next_nsid = NSID_TOP
        self._claimed: set[tuple[int, int]] = set()  # (dev, inode) of namespaces with our id

    # --- owner-thread side -------------------------------------------------------------------

    def _open(self) -> None:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._rt = rtnl.RtSocket()
        ids = [rtnl.nsid_of(payload) for payload in self._dump(rtnl.dump_nsids())]
        ours = [i for i in ids if i is not None and i >= NSID_FLOOR]  # a restart: go on below
        self._next_nsid = min(ours) - 1 if ours else NSID_TOP

    def _nsid_claim(self, fd: int) -> rtnl.Request | None:
        """The request giving this namespace an id below every earlier one (see the module
        docstring), or None if it was given one (or found to have one) already. Best effort:
        an EEXIST reply (it has an id, say from someone else, or the id is taken) is ignored."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self._claimed:  # the id lives as long as the namespace: once is enough
            return None
        if len(self._claimed) >= 1 << 16:
            self._claimed.clear()  # an inode reused since costs one EEXIST, nothing more
        self._claimed.add(key)
        if self._next_nsid < NSID_FLOOR:
            self._next_nsid = NSID_TOP  # 2^29 attaches later: the old ids are long gone
        self._next_nsid -= 1
        return rtnl.new_nsid(fd, self._next_nsid + 1)

    def _close(self) -> None:
        if self._rt is not None:
            self._rt.close()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    def _open_reaper(self) -> None:
        self._reap_rt = rtnl.RtSocket()

    def _close_reaper(self) -> None:
        if self._reap_rt is not None:
            self._reap_rt.close()

    def _reap(self, bridges: tuple[tuple[str, str | None, str | None], ...]) -> bool:
        rt = self._reap_rt
        assert rt is not None
        for name, address, address6 in bridges:
            try:
                self._delete_bridge(name, address, address6, retire=True, rt=rt)
            except Conflict as exc:  # replaced by another kind of link meanwhile: not ours
                log.warning("bridge.retire.skipped", bridge=name, error=exc.message)
        try:
            check(rt.transact([rtnl.del_group(naming.DYING_GROUP)])[0])
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise _map(exc, "cannot delete retired links") from exc
        return True

    def _one(self, request: rtnl.Request, rt: rtnl.RtSocket | None = None) -> list[bytes]:
        rt = rt or self._rt
        assert rt is not None
        return check(rt.transact([request])[0])

    def _find(self, name: str, rt: rtnl.RtSocket | None = None) -> rtnl.Link | None:
        try:
            return rtnl.Link(self._one(rtnl.get_link(name), rt)[0])
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise

    def _ensure_bridge(
        self, name: str, alias: str, address: str, mtu: int, address6: str | None = None
    ) -> int:
        link = self._find(name)
        if link is None:
            try:
                self._one(rtnl.new_bridge(name, mtu, naming.LINK_GROUP))
            except NetlinkError as exc:
                raise _map(exc, f"cannot create bridge {name}", bridge=name) from exc
            if address6 is None:  # an IPv4-only network's bridge needs no IPv6 either
                _disable_ipv6(name)
            try:
                self._one(rtnl.set_alias(name, alias))
            except NetlinkError as exc:
                self._delete(name)
                raise _map(exc, f"cannot set the alias of bridge {name}", bridge=name) from exc
            link = self._find(name)
            if link is None:
                raise NotFound(f"bridge {name} vanished right after creation", bridge=name)
        elif link.kind != "bridge":
            raise Conflict(
                f"{name} exists and is a {link.kind or 'device'}, not a bridge", bridge=name
            )
        elif link.alias != alias and naming.parse_alias(link.alias) is not None:
            self._one(rtnl.set_alias(name, alias))  # ours (a restart): refresh; foreign: leave
        try:
            self._one(rtnl.new_addr(link.index, address))
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise _map(exc, f"cannot add {address} to {name}", bridge=name) from exc
        if address6 is not None:
            self._add_address6(link.index, name, address6)
        self._bridges[name] = link.index
        return link.index

    def _add_address6(self, index: int, name: str, address6: str) -> None:
        """IPv6 on, no DAD on the bridge, then the address (NODAD); present already is fine.

        accept_dad=0 matters: until the bridge's link-local address leaves DAD (~1 s after the
        bridge comes up), a neighbour solicitation for forwarded traffic (DNAT to a container)
        goes out with source `::`, which the container takes for a DAD probe and leaves
        unanswered.
        """
        for key, value in (("disable_ipv6", "0"), ("accept_dad", "0")):
            sysctl = f"/proc/sys/net/ipv6/conf/{name}/{key}"
            with contextlib.suppress(OSError), open(sysctl, "w") as f:
                f.write(value)
        try:
            self._one(rtnl.new_addr6(index, address6))
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise _map(exc, f"cannot add {address6} to {name}", bridge=name) from exc

    def _delete_bridge(
        self,
        name: str,
        address: str | None,
        address6: str | None = None,
        retire: bool = False,
        rt: rtnl.RtSocket | None = None,
    ) -> bool:
        self._bridges.pop(name, None)
        link = self._find(name, rt)
        if link is None:
            return False
        if link.kind != "bridge":
            raise Conflict(f"{name} is a {link.kind or 'device'}, not a bridge", bridge=name)
        if naming.parse_alias(link.alias) is None and link.group != naming.LINK_GROUP:
            # a bridge the user made (--opt bridge=NAME): it stays, only our address goes
            if address is not None:
                with contextlib.suppress(NetlinkError):
                    self._one(rtnl.del_addr(link.index, address), rt)
            if address6 is not None:
                with contextlib.suppress(NetlinkError):
                    self._one(rtnl.del_addr6(link.index, address6), rt)
            return False
        if retire:
            # the device goes with the group delete that follows. It has no port left and no
            # rule points at it; setting it down or removing its address first would each wait
            # for an RCU grace period, the very cost the batch shares out
            self._one(rtnl.set_group(name, naming.DYING_GROUP), rt)
            return True
        return self._delete(name)

    def _delete(self, name: str) -> bool:
        try:
            self._one(rtnl.del_link(name))
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise _map(exc, f"cannot delete {name}", ifname=name) from exc
        return True

    def _bridge_index(self, name: str) -> tuple[int, bool]:
        """(ifindex, came from the cache)."""
        if name in self._bridges:
            return self._bridges[name], True
        link = self._find(name)
        if link is None or link.kind != "bridge":
            raise NotFound(f"bridge {name} does not exist", bridge=name)
        self._bridges[name] = link.index
        return link.index, False

    def _create_veth(self, ep: _Endpoint, fd: int) -> tuple[int, int]:
        """Create the pair; returns the bridge's ifindex and the peer's (0 if the kernel did
        not echo the creation). Raises mapped errors."""
        master, cached = self._bridge_index(ep.bridge)
        claim = self._nsid_claim(fd)  # in the same datagram, ahead of the create
        while True:
            request = rtnl.new_veth(
                name=ep.host_ifname,
                master=master,
                group=naming.LINK_GROUP,
                mtu=ep.mtu,
                peer=ep.ifname,
                peer_mac=ep.mac,
                netns_fd=fd,
            )
            assert self._rt is not None
            results = self._rt.transact([request] if claim is None else [claim, request])
            claim = None
            try:
                echoed = [rtnl.Link(payload) for payload in check(results[-1])]
                return master, next((e.link for e in echoed if e.name == ep.host_ifname), 0)
            except NetlinkError as exc:
                if cached and exc.errno in _STALE_MASTER:  # bridge recreated behind our back
                    self._bridges.pop(ep.bridge, None)
                    master, cached = self._bridge_index(ep.bridge)
                    continue
                if exc.errno != errno.EEXIST:
                    raise _map(exc, f"cannot create veth {ep.host_ifname}") from exc
                if self._find(ep.host_ifname) is not None:
                    raise Conflict(
                        f"host interface {ep.host_ifname} already exists", ifname=ep.host_ifname
                    ) from exc
                raise Conflict(
                    f"interface {ep.ifname} already exists in {ep.netns_path}",
                    ifname=ep.ifname,
                    netns=ep.netns_path,
                ) from exc

    def _configure_inside(self, ep: _Endpoint, ns: rtnl.RtSocket, index: int) -> bool:
        """Peer up, lo up, address and default route inside the namespace: one round trip
        when the peer's ifindex is known (the creation's echo), else a lookup first. The
        messages go in order in one datagram, so the address exists before the route.

        An IPv4-only endpoint's interface generates no IPv6 address (no `fe80::`, so no
        DAD/RS/MLD traffic), as with Docker, which writes `disable_ipv6=1` instead: a netlink
        message here, where a write to the namespace's /proc/sys/net made every later /proc/sys
        lookup walk one cached dentry per namespace visited (17 ms an attach among 10,000).

        False if the namespace has IPv6 disabled (`disable_ipv6=1`, which its new `eth0`
        inherits: adding the IPv6 address fails with EACCES): the endpoint is then IPv4-only,
        as Docker does it, and the IPv6 route (which fails for want of the address) is skipped.
        """
        where = {"ifname": ep.ifname, "netns": ep.netns_path}
        if not index:
            found = ns.transact([rtnl.get_link(ep.ifname)])[0]
            index = rtnl.Link(_step(found, f"find {ep.ifname}", where)[0]).index
        steps = [(rtnl.set_up(rtnl.LOOPBACK_IFINDEX), "set lo up")]
        quiet = -1  # the step whose EAFNOSUPPORT only means the link has no IPv6 at all
        if ep.address6 is None:
            quiet = len(steps)
            steps.append((rtnl.set_no_ipv6_addresses(index), f"keep {ep.ifname} IPv4-only"))
        steps.append((rtnl.set_up(index), f"set {ep.ifname} up"))
        steps.append((rtnl.new_addr(index, ep.address), f"add {ep.address} to {ep.ifname}"))
        if ep.gateway is not None:
            steps.append((rtnl.new_default_route(ep.gateway), f"route via {ep.gateway}"))
        first6 = len(steps)
        if ep.address6 is not None:
            steps.append((rtnl.new_addr6(index, ep.address6), f"add {ep.address6} to {ep.ifname}"))
        if ep.gateway6 is not None:
            steps.append((rtnl.new_default_route6(ep.gateway6), f"route via {ep.gateway6}"))
        results = ns.transact([r for r, _ in steps])
        ipv6 = True
        if ep.address6 is not None:
            added6 = results[first6]
            ipv6 = not (isinstance(added6, NetlinkError) and added6.errno == errno.EACCES)
        for k, ((_, what), result) in enumerate(zip(steps, results, strict=True)):
            no_ipv6 = isinstance(result, NetlinkError) and result.errno == errno.EAFNOSUPPORT
            if (ipv6 or k < first6) and not (k == quiet and no_ipv6):
                _step(result, what, where)
        return ipv6

    def _attach(self, ep: _Endpoint) -> bool:
        fd = netns.open_netns(ep.netns_path)
        try:
            ns = rtnl.RtSocket(netns.socket_visiting(fd, self._home))
            try:
                return self._create_and_configure(ep, fd, ns)
            finally:
                ns.close()
        finally:
            os.close(fd)

    def _create_and_configure(self, ep: _Endpoint, fd: int, ns: rtnl.RtSocket) -> bool:
        """Create the veth and configure both ends; a failure after the create deletes it.
        False if the namespace has IPv6 disabled (see `_configure_inside`)."""
        master, peer = self._create_veth(ep, fd)
        try:
            assert self._rt is not None
            where = {"ifname": ep.host_ifname}
            # Alias and hairpin while still down: a change to a down link sends no
            # notification (netdev_state_change), one fewer per attach. This message also
            # waits, asleep, if the reaper holds rtnl; the sysctl write right after it would
            # spin instead (addrconf's rtnl_trylock + restart_syscall).
            alias = self._rt.transact([rtnl.set_alias(ep.host_ifname, ep.alias, hairpin=True)])
            _step(alias[0], f"set the alias of {ep.host_ifname}", where)
            _disable_ipv6(ep.host_ifname)
            ipv6 = self._configure_inside(ep, ns, peer)
            up, bridge_up = self._rt.transact(
                [rtnl.set_up(name=ep.host_ifname), rtnl.set_up(master)]
            )
            _step(up, f"set {ep.host_ifname} up", where)
            _step(bridge_up, f"set bridge {ep.bridge} up", {"bridge": ep.bridge})
            return ipv6
        except Exception as exc:
            try:
                self._delete(ep.host_ifname)  # removes the peer too
            except AgentError as problem:
                exc.add_note(f"rollback failed, {ep.host_ifname} may be left: {problem}")
            if isinstance(exc, AgentError):
                raise
            raise KernelError(
                f"cannot configure endpoint {ep.host_ifname}: {exc}", netns=ep.netns_path
            ) from exc

    def _enslave(self, host_ifname: str, bridge: str) -> None:
        master, _ = self._bridge_index(bridge)
        assert self._rt is not None
        port, hairpin, bridge_up = self._rt.transact(
            [rtnl.set_master_up(host_ifname, master), rtnl.set_hairpin(host_ifname),
             rtnl.set_up(master)]
        )  # fmt: skip
        _step(hairpin, f"set hairpin on {host_ifname}", {"ifname": host_ifname})
        _step(port, f"enslave {host_ifname} to {bridge}", {"ifname": host_ifname})
        _step(bridge_up, f"set bridge {bridge} up", {"bridge": bridge})

    def _dump(self, request: rtnl.Request) -> list[bytes]:
        assert self._rt is not None
        return check(self._rt.transact([request])[0])

    def _owned_links(self) -> list[LinkInfo]:
        """One link dump and one address dump, decoded by the event decoder (Cython: ~0.3 us a
        message, where pyroute2 takes ~120 us: 1.2 s for 10,000 links at start-up). Links of
        our group or with our alias are kept; the group is set in the creating message, the
        alias by a second one, so a crash in between still leaves a link we recognise."""
        addresses: dict[int, list[str]] = {}
        for ev in accel.nlevents.decode(_as_messages(self._dump(rtnl.dump_addrs()), 20)):
            if ev.family in (socket.AF_INET, socket.AF_INET6):
                addresses.setdefault(ev.index, []).append(f"{ev.address}/{ev.prefixlen}")
        links = accel.nlevents.decode(
            _as_messages(self._dump(rtnl.dump_links()), 16), group=naming.LINK_GROUP
        )
        return [
            LinkInfo(
                index=ev.index,
                name=ev.name,
                kind=ev.kind,
                alias=ev.alias or "",
                master=ev.master,
                up=ev.up,
                addresses=tuple(addresses.get(ev.index, ())),
                group=ev.group,
            )
            for ev in links
        ]

    def _host_routes(self) -> list[ipaddress.IPv4Network]:
        routes = []
        for payload in self._dump(rtnl.dump_routes()):
            found = rtnl.route_dst(payload)
            if found is None or found[0] != rtnl.RT_TABLE_MAIN or found[1].endswith("/0"):
                continue
            routes.append(ipaddress.IPv4Network(found[1], strict=False))
        return routes

    def _retire(self, name: str) -> bool:
        try:
            self._one(rtnl.retire(name, naming.DYING_GROUP))
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise _map(exc, f"cannot retire {name}", ifname=name) from exc
        return True

    def _ifnames_in(self, path: str) -> set[str]:
        fd = netns.open_netns(path)
        try:
            ns = rtnl.RtSocket(netns.socket_visiting(fd, self._home))
        finally:
            os.close(fd)
        try:
            replies = check(ns.transact([rtnl.dump_links()])[0])
            return {rtnl.Link(payload).name for payload in replies}
        finally:
            ns.close()

    @staticmethod
    def _set_ip_forward() -> None:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")

    @staticmethod
    def _set_ip6_forward() -> None:
        with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
            f.write("1\n")

    # --- Trio side ---------------------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        """One owner-thread job; a low-level error that escaped mapping becomes KernelError."""
        try:
            return await self._owner.call(fn, *args)
        except OSError as exc:
            raise KernelError(f"{getattr(fn, '__name__', 'kernel')}: {exc}") from exc

    async def ensure_bridge(
        self, *, name: str, alias: str, address: str, mtu: int = 1500, address6: str | None = None
    ) -> int:
        """Create bridge `name` (down, group LINK_GROUP, `alias`) or adopt it; returns ifindex.

        An adopted bridge keeps a foreign alias (only an alias of ours is rewritten). `address`
        (CIDR) is added unless present; so is `address6` (IPv6 CIDR, no DAD) when given.

        Error handling:
            Conflict if `name` is a link of another kind; InvalidArgument for bad values.
        """
        naming.validate_ifname(name)
        _interface(address)
        if address6 is not None:
            address6 = str(_interface6(address6))
        return await self._call(self._ensure_bridge, name, alias, address, mtu, address6)

    async def delete_bridge(
        self,
        name: str,
        address: str | None = None,
        address6: str | None = None,
        *,
        retire: bool = False,
    ) -> bool:
        """Delete bridge `name`; False if it did not exist; Conflict if it is not a bridge.

        A bridge without our ownership alias was the user's: it is kept (False) and only
        `address` (the gateway CIDR we added) is removed from it. With `retire`, our bridge is
        only moved to the dying link group, to be deleted by the next `reap` batch (a bridge
        delete waits ~30 ms for the kernel).
        """
        return await self._call(
            self._delete_bridge, naming.validate_ifname(name), address, address6, retire
        )

    async def attach(
        self,
        *,
        netns_path: str,
        bridge: str,
        host_ifname: str,
        alias: str,
        ifname: str,
        mac: str,
        mtu: int,
        address: str,
        gateway: str | None,
        address6: str | None = None,
        gateway6: str | None = None,
    ) -> bool:
        """Connect the namespace at `netns_path` to `bridge` by a veth pair; all or nothing.

        `address6` (IPv6 CIDR, added without DAD) and `gateway6` (its default route) are
        optional, for dual-stack networks. Returns False when `address6` was given but the
        namespace has IPv6 disabled: the endpoint is connected with IPv4 only.

        Error handling:
            NotFound (namespace or bridge missing), Conflict (`host_ifname` exists, or `ifname`
            is taken inside the namespace: the message says which), InvalidArgument, else
            KernelError. On any failure the veth (and so its peer) is deleted.
        """
        ep = _Endpoint(
            netns_path=netns_path,
            bridge=naming.validate_ifname(bridge),
            host_ifname=naming.validate_ifname(host_ifname),
            alias=alias,
            ifname=naming.validate_ifname(ifname),
            mac=_mac(mac),
            mtu=mtu,
            address=str(_interface(address)),
            gateway=None if gateway is None else str(_address(gateway)),
            address6=None if address6 is None else str(_interface6(address6)),
            gateway6=None if gateway6 is None else str(_interface6(gateway6).ip),
        )
        return await self._call(self._attach, ep)

    async def detach(self, host_ifname: str) -> bool:
        """Delete the veth (its peer goes with it); False if it was already gone."""
        return await self._call(self._delete, naming.validate_ifname(host_ifname))

    async def retire(self, host_ifname: str) -> bool:
        """Cut a veth off at once (down, out of its bridge, into the dying link group) for
        `reap` to delete later with others; False if it was already gone. ~0.1 ms, where a
        delete waits 15-20 ms for the kernel (RCU)."""
        return await self._call(self._retire, naming.validate_ifname(host_ifname))

    async def reap(self, bridges: Sequence[tuple[str, str | None, str | None]] = ()) -> bool:
        """Delete every retired link in one message (one RCU wait for all), in the reaper
        thread; False if there was none.

        `bridges` (name, gateway CIDR, IPv6 gateway CIDR) of removed networks are retired first,
        in the same job, as `delete_bridge(..., retire=True)` does: a user's bridge only loses
        our addresses. This keeps `network rm` off the netlink lock, which a batch delete in
        progress holds for tens of milliseconds.

        Error handling:
            A name that is no longer a bridge is skipped (logged); KernelError otherwise.
        """
        try:
            return await self._reaper.call(self._reap, tuple(bridges))
        except OSError as exc:
            raise KernelError(f"cannot delete retired links: {exc}") from exc

    async def enslave(self, host_ifname: str, bridge: str) -> None:
        """Make `host_ifname` an up port of `bridge` and the bridge up (repair after the
        bridge was recreated: deleting a bridge releases its ports)."""
        await self._call(
            self._enslave, naming.validate_ifname(host_ifname), naming.validate_ifname(bridge)
        )

    async def link_state(self, name: str) -> tuple[bool, int] | None:
        """(up, master ifindex) of link `name` now, or None if it does not exist (one lean
        RTM_GETLINK: to check a possibly stale event before repairing)."""
        link = await self._call(self._find, naming.validate_ifname(name))
        return None if link is None else (bool(link.flags & rtnl.IFF_UP), link.master)

    async def set_up(self, name: str) -> None:
        """Bring link `name` up (repair of a bridge or veth set down by hand)."""
        await self._call(self._one, rtnl.set_up(name=naming.validate_ifname(name)))

    async def owned_links(self) -> list[LinkInfo]:
        """Host links whose alias this agent wrote (one dump; for adoption after a restart)."""
        return await self._call(self._owned_links)

    async def host_routes(self) -> list[ipaddress.IPv4Network]:
        """Every non-default IPv4 route of the main table (the caller filters)."""
        return await self._call(self._host_routes)

    async def ifnames_in(self, netns_path: str) -> set[str]:
        """Names of the links inside the namespace at `netns_path`."""
        return await self._call(self._ifnames_in, netns_path)

    async def set_ip_forward(self) -> None:
        """Enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward = 1)."""
        await self._call(self._set_ip_forward)

    async def set_ip6_forward(self) -> None:
        """Enable IPv6 forwarding (net.ipv6.conf.all.forwarding = 1). Note: interfaces then
        ignore router advertisements unless their accept_ra is 2 (as with Docker)."""
        await self._call(self._set_ip6_forward)


def _as_messages(payloads: list[bytes], kind: int) -> bytes:
    """Dump payloads put back into netlink messages of type `kind`, for the event decoder."""
    header = struct.Struct("=IHHII")
    return b"".join(
        header.pack(16 + len(p), kind, 0, 0, 0) + p + b"\0" * (-len(p) % 4) for p in payloads
    )


def _disable_ipv6(ifname: str) -> None:
    """No IPv6 on a link that is still down: a bridge port (host veth end) forwards frames and
    needs no address of its own, nor does an IPv4-only network's bridge. Otherwise each gets a
    link-local address and routes, sends DAD/MLD/RS packets when it comes up, and every link
    going up or down walks the whole IPv6 routing table: with 10,000 endpoints on 1,000
    networks, an attach took ~35x longer than with one (measured; 1.1-1.4x without them).
    Nothing to do when IPv6 is off in the kernel or the MTU is below IPv6's minimum (no entry).
    Best effort: a failure (read-only /proc/sys) costs only speed, so it is logged, once.
    """
    global _ipv6_warned
    try:  # os-level: a text-mode open() costs ~10 us more in Python, in the kernel thread
        fd = os.open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not _ipv6_warned:
            _ipv6_warned = True
            log.warning("veth.disable_ipv6.failed", ifname=ifname, error=str(exc))


_ipv6_warned = False


def _interface(value: str) -> ipaddress.IPv4Interface:
    try:
        return ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise InvalidArgument(f"invalid IPv4 address/prefix {value!r}", field="address") from exc


def _interface6(value: str) -> ipaddress.IPv6Interface:
    try:
        return ipaddress.IPv6Interface(value)
    except ValueError as exc:
        raise InvalidArgument(f"invalid IPv6 address {value!r}", field="address6") from exc


def _address(value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise InvalidArgument(f"invalid IPv4 gateway {value!r}", field="gateway") from exc


def _mac(value: str) -> str:
    parts = value.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise InvalidArgument(f"invalid MAC address {value!r}", field="mac")
    try:
        rtnl.mac_bytes(value)
    except ValueError as exc:
        raise InvalidArgument(f"invalid MAC address {value!r}", field="mac") from exc
    return value.lower()


@asynccontextmanager
async def open_kernel(log_level: str = "info", log_format: str = "json") -> AsyncIterator[Kernel]:
    """Start the kernel worker (`agent.kernel.worker`: the owner and reaper threads, in a child
    process) and open its netlink sockets; close them and stop it on exit.

    Error handling:
        If the worker dies meanwhile, KernelError ends the block (and every call in flight).
    """
    conn = await worker.start(log_level, log_format)
    kernel = Kernel(conn.lane("owner"), conn.lane("reaper"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve)
        try:
            await kernel._call(kernel._open)
            await kernel._reaper.call(kernel._open_reaper)
            yield kernel
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(KernelError):
                await kernel._reaper.call(kernel._close_reaper)
                await kernel._call(kernel._close)
            await conn.stop()  # ends `serve`, and with it the nursery
