"""Bridges and veth endpoints through netlink: the synchronous work of the kernel worker.

Theory of operation (DESIGN sections 3-4):
- `Ops` lives only in the worker process (`agent.kernel.worker`): its owner thread runs every
  job but `reap` (and the reaper's open/close), which runs in the reaper thread with its own
  socket; `JOBS` says which method runs which `agent.kernel.jobs.Job`. Each job is one call,
  so it is atomic with respect to cancellation: a whole attach (create, configure, or roll
  back) is ONE job. Arguments arrive as plain tuples (`jobs.BridgeFields`,
  `jobs.AttachFields`), validated by agentd before they were sent.
- Every message is built by `agent.kernel.rtnl` (lean, `struct`-based) and ifindexes are kept
  instead of looked up (pyroute2's `get`/`link_lookup` are slow and leak ~1.6 KB a call); dumps
  are read by `agent.kernel.dumps`.
- The veth is created in one message with its peer born inside the target namespace, named,
  with its MAC, MTU and one queue per end, the host end enslaved and down (no udev MAC race).
  The host end gets its alias and hairpin mode, then `sysctl.disable_ipv6`, while still down, then
  comes up: every notification about the host end costs the kernel a linear scan of the host's
  namespace ids (`__peernet2id`, one id per container namespace), and changes to a down link
  send none, so an attach makes five. A disconnect only retires a veth (`retire`); `reap`, in
  the reaper thread, deletes every retired link at once (see `agent.service.reaper`). The
  in-namespace steps use a socket the owner thread opens there, stepping into the namespace for the
  `socket()` call only (`netns.socket_visiting`); the create's echo names the peer's ifindex,
  so they are one datagram.
- Each namespace gets, with its first veth, an id below every earlier one, in the same
  datagram as the create (`netns.NsidCounter`): the kernel's scan for it is then short.
- Ownership is visible in the kernel: IFLA_IFALIAS (a create ignores it) and `naming.LINK_GROUP`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from collections.abc import Callable
from typing import Any

from agent.core import naming
from agent.core.errors import AgentError, Conflict, KernelError, NotFound
from agent.kernel import dumps, hostveth, netns, rtnl, rtsocket, sysctl
from agent.kernel.base import LinkInfo
from agent.kernel.jobs import AttachFields, BridgeFields, Job
from agent.kernel.rtsocket import NetlinkError, check, map_error, step
from agent.log import get_logger

log = get_logger("agent.kernel")

_STALE_MASTER = (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP)


class Ops:
    """The kernel worker's state (sockets, bridge ifindexes, namespace-id counter) and jobs.

    Each public method is one job (see `JOBS`), called by one thread at a time: the owner
    thread, or for `open_reaper`/`reap`/`close_reaper` the reaper thread.

    Resource handling:
        `open` (owner thread) and `open_reaper` (reaper thread) make the sockets; `close` and
        `close_reaper` close them.

    Error handling:
        Netlink errors are mapped once, here: EEXIST -> Conflict, ENODEV -> NotFound, anything
        else -> KernelError, each naming the step that failed.
    """

    def __init__(self) -> None:
        self._rt: rtsocket.RtSocket | None = None
        self._home = -1  # the owner thread's own namespace, to come back to (socket_visiting)
        self._reap_rt: rtsocket.RtSocket | None = None
        self._bridges: dict[str, int] = {}
        self._nsids = netns.NsidCounter()

    # --- resources -----------------------------------------------------------------------------

    def open(self) -> None:
        """The owner thread's socket, and where its namespace ids go on after a restart."""
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._rt = rtsocket.RtSocket()
        self._nsids.resume(dumps.nsids(self._rt))

    def close(self) -> None:
        if self._rt is not None:
            self._rt.close()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    def open_reaper(self) -> None:
        self._reap_rt = rtsocket.RtSocket()

    def close_reaper(self) -> None:
        if self._reap_rt is not None:
            self._reap_rt.close()

    # --- bridges -------------------------------------------------------------------------------

    def ensure_bridge(self, fields: tuple[Any, ...]) -> int:
        """Create the bridge (down, group LINK_GROUP, its alias) or adopt it; its ifindex.

        An adopted bridge keeps a foreign alias (only an alias of ours is rewritten); the
        addresses are added unless present (IPv6 without DAD).
        """
        br = BridgeFields._make(fields)
        name = br.name
        link = self._find(name)
        if link is None:
            try:
                self._one(rtnl.new_bridge(name, br.mtu, naming.LINK_GROUP))
            except NetlinkError as exc:
                raise map_error(exc, f"cannot create bridge {name}", bridge=name) from exc
            if br.address6 is None:  # an IPv4-only network's bridge needs no IPv6 either
                sysctl.disable_ipv6(name)
            if br.alias:
                try:
                    self._one(rtnl.set_alias(name, br.alias))
                except NetlinkError as exc:
                    self.detach(name)
                    raise map_error(
                        exc, f"cannot set the alias of bridge {name}", bridge=name
                    ) from exc
            link = self._find(name)
            if link is None:
                raise NotFound(f"bridge {name} vanished right after creation", bridge=name)
        elif link.kind != "bridge":
            raise Conflict(
                f"{name} exists and is a {link.kind or 'device'}, not a bridge", bridge=name
            )
        elif br.alias and link.alias != br.alias and naming.parse_alias(link.alias) is not None:
            self._one(rtnl.set_alias(name, br.alias))  # ours (a restart): refresh; foreign: leave
        if br.address is not None:
            try:
                self._one(rtnl.new_addr(link.index, br.address))
            except NetlinkError as exc:
                if exc.errno != errno.EEXIST:
                    raise map_error(exc, f"cannot add {br.address} to {name}", bridge=name) from exc
        if br.address6 is not None:
            sysctl.enable_ipv6_without_dad(name)
            try:
                self._one(rtnl.new_addr6(link.index, br.address6))
            except NetlinkError as exc:
                if exc.errno != errno.EEXIST:
                    raise map_error(
                        exc, f"cannot add {br.address6} to {name}", bridge=name
                    ) from exc
        self._bridges[name] = link.index
        return link.index

    def delete_bridge(self, fields: tuple[Any, ...], retire: bool = False) -> bool:
        """Delete our bridge (False if absent; Conflict if not a bridge); a user's bridge only
        loses our addresses (False). With `retire`, only move it to the dying group."""
        br = BridgeFields._make(fields)
        return self._delete_bridge(br.name, br.address, br.address6, retire, self._rt)

    def _delete_bridge(
        self,
        name: str,
        address: str | None,
        address6: str | None,
        retire: bool,
        rt: rtsocket.RtSocket | None,
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
        return self.detach(name)

    def _bridge_index(self, name: str) -> tuple[int, bool]:
        """(ifindex, came from the cache)."""
        if name in self._bridges:
            return self._bridges[name], True
        link = self._find(name)
        if link is None or link.kind != "bridge":
            raise NotFound(f"bridge {name} does not exist", bridge=name)
        self._bridges[name] = link.index
        return link.index, False

    # --- endpoints -----------------------------------------------------------------------------

    def attach(self, fields: tuple[Any, ...]) -> bool:
        """Join the namespace to the bridge by a veth pair, all or nothing; False if the
        namespace has IPv6 disabled (see `_configure_inside`)."""
        att = AttachFields._make(fields)
        fd = netns.open_netns(att.netns)
        try:
            ns = rtsocket.RtSocket(netns.socket_visiting(fd, self._home))
            try:
                return self._create_and_configure(att, fd, ns)
            finally:
                ns.close()
        finally:
            os.close(fd)

    def _create_and_configure(self, att: AttachFields, fd: int, ns: rtsocket.RtSocket) -> bool:
        """Create the veth and configure both ends; a failure after the create deletes it."""
        master, peer = self._create_veth(att, fd)
        try:
            assert self._rt is not None
            where = {"ifname": att.host_ifname}
            # Alias and hairpin while still down: a change to a down link sends no
            # notification (netdev_state_change), one fewer per attach. This message also
            # waits, asleep, if the reaper holds rtnl; the sysctl write right after it would
            # spin instead (addrconf's rtnl_trylock + restart_syscall).
            alias = self._rt.transact([rtnl.set_alias(att.host_ifname, att.alias, hairpin=True)])
            step(alias[0], f"set the alias of {att.host_ifname}", where)
            sysctl.disable_ipv6(att.host_ifname)
            ipv6 = self._configure_inside(att, ns, peer)
            up, bridge_up = self._rt.transact(
                [rtnl.set_up(name=att.host_ifname), rtnl.set_up(master)]
            )
            step(up, f"set {att.host_ifname} up", where)
            step(bridge_up, f"set bridge {att.bridge} up", {"bridge": att.bridge})
            return ipv6
        except Exception as exc:
            try:
                self.detach(att.host_ifname)  # removes the peer too
            except AgentError as problem:
                exc.add_note(f"rollback failed, {att.host_ifname} may be left: {problem}")
            if isinstance(exc, AgentError):
                raise
            raise KernelError(
                f"cannot configure endpoint {att.host_ifname}: {exc}", netns=att.netns
            ) from exc

    def _create_veth(self, att: AttachFields, fd: int) -> tuple[int, int]:
        """Create the pair; returns the bridge's ifindex and the peer's (0 if the kernel did
        not echo the creation). Raises mapped errors."""
        master, cached = self._bridge_index(att.bridge)
        claim = self._nsids.claim(fd)  # in the same datagram, ahead of the create
        while True:
            request = rtnl.new_veth(
                name=att.host_ifname,
                master=master,
                group=naming.LINK_GROUP,
                mtu=att.mtu,
                peer=att.ifname,
                peer_mac=att.mac,
                netns_fd=fd,
            )
            assert self._rt is not None
            results = self._rt.transact([request] if claim is None else [claim, request])
            claim = None
            try:
                echoed = [rtsocket.Link(payload) for payload in check(results[-1])]
                return master, next((e.link for e in echoed if e.name == att.host_ifname), 0)
            except NetlinkError as exc:
                if cached and exc.errno in _STALE_MASTER:  # bridge recreated behind our back
                    self._bridges.pop(att.bridge, None)
                    master, cached = self._bridge_index(att.bridge)
                    continue
                if exc.errno != errno.EEXIST:
                    raise map_error(exc, f"cannot create veth {att.host_ifname}") from exc
                if self._find(att.host_ifname) is not None:
                    raise Conflict(
                        f"host interface {att.host_ifname} already exists", ifname=att.host_ifname
                    ) from exc
                raise Conflict(
                    f"interface {att.ifname} already exists in {att.netns}",
                    ifname=att.ifname,
                    netns=att.netns,
                ) from exc

    def _configure_inside(self, att: AttachFields, ns: rtsocket.RtSocket, index: int) -> bool:
        """Peer up, lo up, address and default route inside the namespace: one round trip
        when the peer's ifindex is known (the creation's echo), else a lookup first. The
        messages go in order in one datagram, so the address exists before the route.

        An IPv4-only endpoint's interface generates no IPv6 address (no `fe80::`, so no
        DAD/RS/MLD traffic), as with Docker, which writes `disable_ipv6=1` instead: a netlink
        message here (see `agent.kernel.sysctl` for why not /proc/sys inside).

        False if the namespace has IPv6 disabled (`disable_ipv6=1`, which its new `eth0`
        inherits: adding the IPv6 address fails with EACCES): the endpoint is then IPv4-only,
        as Docker does it, and the IPv6 route (which fails for want of the address) is skipped.
        """
        where = {"ifname": att.ifname, "netns": att.netns}
        if not index:
            found = ns.transact([rtnl.get_link(att.ifname)])[0]
            index = rtsocket.Link(step(found, f"find {att.ifname}", where)[0]).index
        steps = [(rtnl.set_up(rtnl.LOOPBACK_IFINDEX), "set lo up")]
        quiet = -1  # the step whose EAFNOSUPPORT only means the link has no IPv6 at all
        if att.address6 is None:
            quiet = len(steps)
            steps.append((rtnl.set_no_ipv6_addresses(index), f"keep {att.ifname} IPv4-only"))
        steps.append((rtnl.set_up(index), f"set {att.ifname} up"))
        steps.append((rtnl.new_addr(index, att.address), f"add {att.address} to {att.ifname}"))
        if att.gateway is not None:
            steps.append((rtnl.new_default_route(att.gateway), f"route via {att.gateway}"))
        first6 = len(steps)
        if att.address6 is not None:
            steps.append(
                (rtnl.new_addr6(index, att.address6), f"add {att.address6} to {att.ifname}")
            )
        if att.gateway6 is not None:
            steps.append((rtnl.new_default_route6(att.gateway6), f"route via {att.gateway6}"))
        results = ns.transact([r for r, _ in steps])
        ipv6 = True
        if att.address6 is not None:
            added6 = results[first6]
            ipv6 = not (isinstance(added6, NetlinkError) and added6.errno == errno.EACCES)
        for k, ((_, what), result) in enumerate(zip(steps, results, strict=True)):
            no_ipv6 = isinstance(result, NetlinkError) and result.errno == errno.EAFNOSUPPORT
            if (ipv6 or k < first6) and not (k == quiet and no_ipv6):
                step(result, what, where)
        return ipv6

    def detach(self, name: str) -> bool:
        """Delete link `name` now (a veth's peer goes with it); False if it was gone."""
        try:
            self._one(rtnl.del_link(name))
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise map_error(exc, f"cannot delete {name}", ifname=name) from exc
        return True

    def retire(self, name: str) -> bool:
        """Down, out of its bridge, into the dying group; False if it was gone."""
        try:
            self._one(rtnl.retire(name, naming.DYING_GROUP))
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise map_error(exc, f"cannot retire {name}", ifname=name) from exc
        return True

    def reap(self, bridges: tuple[tuple[Any, ...], ...]) -> bool:
        """Retire `bridges` (fields of each), then delete the dying group in one message;
        False if it was empty. A name that is no longer a bridge is skipped (logged)."""
        rt = self._reap_rt
        assert rt is not None
        for fields in bridges:
            br = BridgeFields._make(fields)
            try:
                self._delete_bridge(br.name, br.address, br.address6, True, rt)
            except Conflict as exc:  # replaced by another kind of link meanwhile: not ours
                log.warning("bridge.retire.skipped", bridge=br.name, error=exc.message)
        try:
            check(rt.transact([rtnl.del_group(naming.DYING_GROUP)])[0])
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise map_error(exc, "cannot delete retired links") from exc
        return True

    def enslave(self, host_ifname: str, bridge: str) -> None:
        """Make `host_ifname` an up port (with hairpin) of `bridge`, and the bridge up."""
        master, _ = self._bridge_index(bridge)
        assert self._rt is not None
        port, hairpin, bridge_up = self._rt.transact(
            [rtnl.set_master_up(host_ifname, master), rtnl.set_hairpin(host_ifname),
             rtnl.set_up(master)]
        )  # fmt: skip
        step(hairpin, f"set hairpin on {host_ifname}", {"ifname": host_ifname})
        step(port, f"enslave {host_ifname} to {bridge}", {"ifname": host_ifname})
        step(bridge_up, f"set bridge {bridge} up", {"bridge": bridge})

    def set_alias(self, name: str, alias: str) -> None:
        """Rewrite the ownership mark (`agent.core.marks`) of our link `name`."""
        assert self._rt is not None
        reply = self._rt.transact([rtnl.set_alias(name, alias)])[0]
        step(reply, f"set the alias of {name}", {"ifname": name})

    # --- observation ---------------------------------------------------------------------------

    def link_state(self, name: str) -> tuple[bool, int] | None:
        """(up, master ifindex) of link `name`, or None if it does not exist."""
        link = self._find(name)
        return None if link is None else (bool(link.flags & rtnl.IFF_UP), link.master)

    def owned_links(self) -> list[LinkInfo]:
        assert self._rt is not None
        return dumps.owned_links(self._rt)

    def host_routes(self) -> list[ipaddress.IPv4Network]:
        assert self._rt is not None
        return dumps.host_routes(self._rt)

    def ifnames_in(self, path: str) -> set[str]:
        """The names of the links inside the namespace at `path`."""
        return dumps.read_in(path, self._home, dumps.link_names)

    def addresses_in(self, path: str, ifname: str) -> list[str] | None:
        """The addresses of `ifname` in the namespace at `path` (None: no such link)."""
        return dumps.read_in(path, self._home, lambda ns: dumps.addresses_of(ns, ifname))

    def set_ip_forward(self) -> None:
        sysctl.set_ip_forward()

    def set_ip6_forward(self) -> None:
        sysctl.set_ip6_forward()

    # --- helpers -------------------------------------------------------------------------------

    def _one(self, request: rtnl.Request, rt: rtsocket.RtSocket | None = None) -> list[bytes]:
        rt = rt or self._rt
        assert rt is not None
        return check(rt.transact([request])[0])

    def _find(self, name: str, rt: rtsocket.RtSocket | None = None) -> rtsocket.Link | None:
        try:
            return rtsocket.Link(self._one(rtnl.get_link(name), rt)[0])
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise


#: The job table: which method of `Ops` runs each `Job` (called as `JOBS[job](ops, *args)`).
JOBS: dict[Job, Callable[..., Any]] = {
    Job.OPEN: Ops.open,
    Job.CLOSE: Ops.close,
    Job.ENSURE_BRIDGE: Ops.ensure_bridge,
    Job.DELETE_BRIDGE: Ops.delete_bridge,
    Job.ATTACH: Ops.attach,
    Job.ATTACH_HOST: hostveth.attach_host,  # Docker's Join: both ends in the host namespace
    Job.DETACH: Ops.detach,
    Job.RETIRE: Ops.retire,
    Job.ENSLAVE: Ops.enslave,
    Job.SET_ALIAS: Ops.set_alias,
    Job.LINK_STATE: Ops.link_state,
    Job.OWNED_LINKS: Ops.owned_links,
    Job.HOST_ROUTES: Ops.host_routes,
    Job.IFNAMES_IN: Ops.ifnames_in,
    Job.ADDRESSES_IN: Ops.addresses_in,
    Job.SET_IP_FORWARD: Ops.set_ip_forward,
    Job.SET_IP6_FORWARD: Ops.set_ip6_forward,
    Job.OPEN_REAPER: Ops.open_reaper,
    Job.CLOSE_REAPER: Ops.close_reaper,
    Job.REAP: Ops.reap,
}
