"""A veth pair made with both ends in the host namespace: Docker's Join (a job of the worker).

Theory of operation. The usual attach (`agent.kernel.ops.Ops.attach`) makes the pair with its
peer born inside the target namespace and configures it there. Docker's remote driver protocol
works the other way: Join answers the *name* of an interface in the host namespace
(`InterfaceName.SrcName`), and dockerd moves that interface into the container, renames it
(`DstPrefix` + index), and gives it its address, MAC and routes itself. So here the pair is
created in one message with both ends in the host namespace (name, MAC, MTU, one queue per end
set at creation, so there is no udev MAC race), the host end enslaved to the bridge, given its
ownership alias and hairpin mode while still down, then brought up with the bridge. The peer
stays down and unconfigured: it is Docker's from then on. Deleting the host end later (Leave)
deletes the peer wherever it is.

All or nothing: a failure after the create deletes the pair. The job runs in the worker's
owner thread like every other link change (`JOBS` in `agent.kernel.ops` names it); it is kept
apart from `Ops` so that module stays within its size.
"""

from __future__ import annotations

import errno
from typing import Any, Protocol

from agent.core import naming
from agent.core.errors import AgentError, Conflict, KernelError
from agent.kernel import rtnl, rtsocket, sysctl
from agent.kernel.jobs import AttachFields
from agent.kernel.rtsocket import NetlinkError, check, map_error, step

_STALE_MASTER = (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP)


class Ops(Protocol):
    """What this job uses of `agent.kernel.ops.Ops` (named here: ops imports this module)."""

    _rt: rtsocket.RtSocket | None
    _bridges: dict[str, int]

    def _bridge_index(self, name: str) -> tuple[int, bool]: ...

    def _find(self, name: str, rt: rtsocket.RtSocket | None = None) -> rtsocket.Link | None: ...

    def detach(self, name: str) -> bool: ...


def attach_host(ops: Ops, fields: tuple[Any, ...]) -> bool:
    """Make the pair `att.host_ifname` (a port of `att.bridge`, up) / `att.ifname` (down),
    both in the host namespace; the peer gets `att.mac` and `att.mtu`. Returns True (the
    namespace's IPv6 is Docker's business, as is every address of the peer).

    Error handling: EEXIST -> Conflict naming the end that exists; other netlink errors
    mapped by `rtsocket.map_error`; nothing is left on failure.
    """
    att = AttachFields._make(fields)
    rt = ops._rt
    assert rt is not None
    master, cached = ops._bridge_index(att.bridge)
    while True:
        request = rtnl.new_veth(
            name=att.host_ifname, master=master, group=naming.LINK_GROUP, mtu=att.mtu,
            peer=att.ifname, peer_mac=att.mac, netns_fd=None,
        )  # fmt: skip
        try:
            check(rt.transact([request])[0])
            break
        except NetlinkError as exc:
            if cached and exc.errno in _STALE_MASTER:  # bridge recreated behind our back
                ops._bridges.pop(att.bridge, None)
                master, cached = ops._bridge_index(att.bridge)
                continue
            if exc.errno == errno.EEXIST:
                taken = att.host_ifname if ops._find(att.host_ifname) else att.ifname
                raise Conflict(f"interface {taken} already exists", ifname=taken) from exc
            raise map_error(exc, f"cannot create veth {att.host_ifname}") from exc
    try:
        where = {"ifname": att.host_ifname}
        alias = rt.transact([rtnl.set_alias(att.host_ifname, att.alias, hairpin=True)])
        step(alias[0], f"set the alias of {att.host_ifname}", where)
        sysctl.disable_ipv6(att.host_ifname)
        up, bridge_up = rt.transact([rtnl.set_up(name=att.host_ifname), rtnl.set_up(master)])
        step(up, f"set {att.host_ifname} up", where)
        step(bridge_up, f"set bridge {att.bridge} up", {"bridge": att.bridge})
    except Exception as exc:
        try:
            ops.detach(att.host_ifname)  # the peer goes with it
        except AgentError as problem:
            exc.add_note(f"rollback failed, {att.host_ifname} may be left: {problem}")
        if isinstance(exc, AgentError):
            raise
        raise KernelError(f"cannot configure endpoint {att.host_ifname}: {exc}") from exc
    return True
