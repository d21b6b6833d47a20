"""Endpoint requests: connect (or reserve, then attach), disconnect, release, list.

Theory of operation. A connect is decided and reserved synchronously by the core
(`plan.reserve_endpoint`: addresses taken, the endpoint in the topology, no await in between),
then applied: the veth (one kernel job), the port rules if it publishes any, then the store;
each step is undone if a later one fails, and the reservation is given back. Docker's
CreateEndpoint/Join split is the same in two requests: `reserve` takes the addresses and
records the endpoint without a namespace, `attach` gives it one.

Requests confined to one namespace run concurrently: the topology lock in shared mode (the
exclusive mode when the endpoint publishes ports, connecting or going: a mapping is checked
against every other one, and each port transaction must see the others' results) and a
per-namespace lock, so each namespace's requests keep their order.

A disconnect is all or nothing too, and crash-safe: the store record goes first (a crash after
it leaves a veth that start-up adoption deletes as a leftover), then the port rules, then the
veth is cut off (`retire`: one netlink message; the reaper deletes it later with others). Its
addresses go back to the pool once the veth is really gone.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec
import trio

from agent.core import naming, plan
from agent.core.attach import attachment_of
from agent.core.errors import InvalidArgument, NotFound
from agent.core.model import Endpoint, Network
from agent.log import get_logger
from agent.service.context import Shared, undo
from agent.store.sqlite import Writer

log = get_logger("agent.service.endpoints")


class Endpoints:
    """Endpoint requests and the building blocks other parts use (`connect_locked`,
    `release`, `release_vanished`: their caller holds the topology lock)."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared

    # -- connect ------------------------------------------------------------------------------

    async def connect(self, spec: plan.EndpointSpec) -> Endpoint:
        """Attach the namespace `spec.netns` to `spec.network` by a veth pair."""
        if spec.netns is None:
            raise InvalidArgument("connect needs a namespace", field="netns")
        s = self.s
        path = s.ns.resolve(spec.netns)
        key = s.ns.netns_key(path)
        async with s.netns_locks.hold(key):
            await self._wait_for_dying(key)
            # a port mapping is checked against every other one: that takes the whole lock
            async with s.lock if spec.ports else s.lock.shared():
                return await self.connect_locked(spec, path, key)

    async def _wait_for_dying(self, key: str) -> None:
        """The namespace's previous interface may still be dying (its eth0 name taken)."""
        if (dying := self.s.reaper.pending(f"ns:{key}")) is not None:
            await dying.wait()

    async def connect_locked(
        self, spec: plan.EndpointSpec, path: str, key: str, *, sandbox: str | None = None
    ) -> Endpoint:
        """`connect` for a caller holding the lock; `path` is the namespace, `key` its id."""
        topo = self.s.topo
        net = topo.find_network(spec.network)
        ep = plan.reserve_endpoint(
            topo, net, spec, new_id=secrets.token_hex(32), netns=path, netns_key=key,
            sandbox=sandbox,
        )  # fmt: skip
        try:
            applied = await self._join(ep, net, ip6_requested=spec.ip6 is not None)
        except BaseException:
            topo.remove_endpoint(ep.id)
            topo.release_addresses(ep.network_id, ep.ip, ep.ip6)
            raise
        self._connected(applied, ep, net)
        return applied

    def _connected(self, applied: Endpoint, planned: Endpoint, net: Network) -> None:
        if applied.ip6 != planned.ip6:  # IPv6 disabled in the namespace: that address is free
            self.s.topo.release_addresses(net.id, None, planned.ip6)
        log.info("endpoint.connect.complete", endpoint_id=applied.id, network=net.name,
                 ip=applied.ip)  # fmt: skip
        self.s.bus.publish("endpoint", "connected", applied.id, network=net.name,
                           netns=applied.netns, ip=applied.ip,
                           names=",".join(applied.aliases))  # fmt: skip

    async def _join(
        self, ep: Endpoint, net: Network, *, ip6_requested: bool, in_host: bool = False
    ) -> Endpoint:
        """Kernel, then port rules, then store; each undone if a later one fails. Returns the
        endpoint as applied: without its IPv6 address if the namespace has IPv6 disabled (as
        Docker does it), unless that address was asked for (InvalidArgument, nothing changed).
        """
        s = self.s
        topo = s.topo

        async def veth_back() -> None:
            await s.kernel.detach(ep.host_ifname)

        async def rules_back() -> None:
            await s.apply_firewall(endpoints=(e for e in topo.with_ports() if e.id != ep.id))

        with trio.CancelScope(shield=True):
            make = s.kernel.attach_host if in_host else s.kernel.attach
            ipv6 = await make(attachment_of(net, ep))
            done = [veth_back]
            try:
                if not ipv6 and ep.ip6 is not None:
                    if ip6_requested:
                        raise InvalidArgument(
                            f"namespace {ep.netns!r} has IPv6 disabled: it cannot have {ep.ip6}",
                            netns=ep.netns,
                            ip6=ep.ip6,
                        )
                    ep = msgspec.structs.replace(ep, ip6=None)
                    topo.add_endpoint(ep)  # replaces it: no IPv6 port rules, none stored
                if ep.ports:
                    await s.apply_firewall()
                    done.insert(0, rules_back)
                with s.store.transaction() as w:
                    w.put_endpoint(ep)
                    self._save_cursors(w, net.id)
            except BaseException as exc:
                await undo(exc, done)
                raise
        return ep

    def _save_cursors(self, w: Writer, network_id: str) -> None:
        topo = self.s.topo
        w.set_meta(f"cursor:{network_id}", str(topo.allocators[network_id].cursor))
        if (alloc6 := topo.allocators6.get(network_id)) is not None:
            w.set_meta(f"cursor6:{network_id}", str(alloc6.cursor))

    # -- reserve, then attach (Docker's CreateEndpoint, Join) -------------------------------

    async def reserve(self, spec: plan.EndpointSpec) -> Endpoint:
        """Take an endpoint's addresses and record it, without a namespace yet."""
        s = self.s
        await self._wait_for_dying_address(spec)
        async with s.lock if spec.ports else s.lock.shared():
            net = s.topo.find_network(spec.network)
            ep = plan.reserve_endpoint(s.topo, net, spec, new_id=secrets.token_hex(32))
            try:
                with s.store.transaction() as w:  # no await: nothing to shield
                    w.put_endpoint(ep)
                    self._save_cursors(w, net.id)
            except BaseException:
                s.topo.remove_endpoint(ep.id)
                s.topo.release_addresses(ep.network_id, ep.ip, ep.ip6)
                raise
            s.bus.publish("endpoint", "reserved", ep.id, network=net.name, ip=ep.ip,
                          names=",".join(ep.aliases))  # fmt: skip
            return ep

    async def _wait_for_dying_address(self, spec: plan.EndpointSpec) -> None:
        """An address asked for may be that of an endpoint just removed, whose veth is still
        being deleted (its address returns to the pool with the reaper's batch): an engine's
        own IPAM (Docker's) hands it out again at once. Wait for the batch, then decide."""
        s = self.s
        if spec.ip is None or not s.reaper.backlog:
            return
        net = s.topo.find_network(spec.network)
        ip = plan.parse_ip(spec.ip)
        held = any(e.ip == str(ip) for e in s.topo.endpoints_of(net.id))
        if s.topo.allocators[net.id].is_allocated(ip) and not held:
            await s.reaper.wait_idle()

    async def attach(
        self, ref: str, netns: str, *, ifname: str | None = None, in_host: bool = False
    ) -> Endpoint:
        """Give the reserved endpoint `ref` (id or attachment key) the namespace `netns`.

        With `in_host`, the veth pair is made in the host namespace and its peer
        (`naming.host_peer_name`, the endpoint's `ifname`) is left unconfigured for the
        engine to move into `netns` (Docker's Join); `ifname` is then ignored, and the
        endpoint's namespace key is `naming.engine_netns_key(netns)`: the namespace need not
        exist yet (Docker makes it after the Join).
        """
        s = self.s
        path = s.ns.resolve(netns)
        if in_host:  # the namespace may not exist yet: Docker makes it after the Join
            ifname = naming.host_peer_name(s.topo.find_endpoint(ref).id)
            key = naming.engine_netns_key(path)
        else:
            key = s.ns.netns_key(path)
        async with s.netns_locks.hold(key):
            await self._wait_for_dying(key)
            async with s.lock if s.topo.find_endpoint(ref).ports else s.lock.shared():
                reserved = s.topo.find_endpoint(ref)
                joined = plan.join_endpoint(
                    s.topo, reserved, netns=path, netns_key=key, ifname=ifname
                )
                net = s.topo.networks[joined.network_id]
                try:
                    applied = await self._join(joined, net, ip6_requested=False, in_host=in_host)
                except BaseException:
                    s.topo.add_endpoint(reserved)  # back to reserved
                    raise
                self._connected(applied, joined, net)
                return applied

    def propose_address(self, network: str) -> str:
        """The address the next `reserve` on `network` would take, left free (the cursor moves
        past it, so the next proposal differs): Docker's RequestAddress, whose CreateEndpoint
        then reserves it by value."""
        net = self.s.topo.find_network(network)
        alloc = self.s.topo.allocators[net.id]
        ip = alloc.allocate()
        alloc.release(ip)
        return str(ip)

    # -- disconnect -----------------------------------------------------------------------

    async def disconnect(self, network: str, netns: str, *, force: bool = False) -> Endpoint | None:
        """Detach the namespace `netns` from `network`. With `force`, a namespace that is not
        connected is not an error (None)."""
        s = self.s
        path = s.ns.resolve(netns)
        try:
            key: str | None = s.ns.netns_key(path)
        except NotFound:  # the namespace is gone: find its endpoint by the path it was given
            key = None

        def find() -> Endpoint | None:
            net = s.topo.find_network(network)
            matches = s.topo.endpoints_in(key) if key else s.topo.endpoints_of(net.id)
            for ep in matches:
                if ep.network_id == net.id and (key is not None or ep.netns == path):
                    return ep
            if force:
                return None
            raise NotFound(
                f"namespace {netns!r} is not connected to network {net.name!r}",
                network=net.name,
                netns=netns,
            )

        async with s.netns_locks.hold(key or path):
            return await self._release_found(find)

    async def remove(self, ref: str, *, force: bool = False) -> Endpoint | None:
        """Disconnect (or give up the reservation of) the endpoint `ref`: its id, a unique id
        prefix or its attachment key. With `force`, an unknown endpoint is not an error."""
        s = self.s

        def find() -> Endpoint | None:
            try:
                return s.topo.find_endpoint(ref)
            except NotFound:
                if force:
                    return None
                raise

        first = find()
        if first is None:
            return None
        async with s.netns_locks.hold(first.netns_key or first.id):
            return await self._release_found(find)

    async def _release_found(self, find: Callable[[], Endpoint | None]) -> Endpoint | None:
        """Release what `find` names under the topology lock: shared, or exclusive when the
        endpoint publishes ports (its rules change, and each port transaction must see every
        other one's result: two shared ones would each put back the other's rules)."""
        s = self.s
        while True:
            peek = find()
            if peek is None:
                return None
            async with s.lock if peek.ports else s.lock.shared():
                ep = find()
                if ep is None:
                    return None
                if ep.ports and not peek.ports:
                    continue  # it published ports meanwhile: again, exclusively
                await self.release(ep)
                return ep

    async def release(self, ep: Endpoint, *, action: str = "disconnected") -> None:
        """Store record, port rules, then the veth cut off; all or nothing (see the module
        docstring). The caller holds the topology lock."""
        s = self.s
        retired = False

        async def record_back() -> None:
            with s.store.transaction() as w:
                w.put_endpoint(ep)

        async def rules_back() -> None:
            await s.apply_firewall()

        with trio.CancelScope(shield=True):
            with s.store.transaction() as w:
                w.delete_endpoint(ep.id)
            done = [record_back]
            try:
                if ep.ports and ep.joined:  # no DNAT to an address about to vanish
                    await s.apply_firewall(
                        endpoints=(e for e in s.topo.with_ports() if e.id != ep.id)
                    )
                    done.insert(0, rules_back)
                if ep.joined:
                    retired = await s.kernel.retire(ep.host_ifname)
            except BaseException as exc:
                await undo(exc, done)
                raise
        s.topo.remove_endpoint(ep.id)
        if retired:
            s.reaper.retired_endpoint(ep.network_id, ep.ip, ep.ip6, ep.netns_key)
        else:
            s.topo.release_addresses(ep.network_id, ep.ip, ep.ip6)
        log.info(f"endpoint.{action}.complete", endpoint_id=ep.id, ip=ep.ip)
        net = s.topo.networks[ep.network_id]
        s.bus.publish("endpoint", action, ep.id, network=net.name, netns=ep.netns, ip=ep.ip,
                      names=",".join(ep.aliases))  # fmt: skip

    async def release_vanished(self, host_ifname: str) -> Endpoint | None:
        """The veth `host_ifname` is gone (its namespace was deleted, or the veth by hand):
        release its endpoint. None when it is not (or no longer) one of ours. The caller holds
        the topology lock exclusively."""
        ep = self.s.topo.endpoint_of_veth(host_ifname)
        if ep is None:
            return None
        await self.release(ep, action="released")
        return ep

    def filter(self, network: str | None = None) -> list[Endpoint]:
        """Endpoints (of `network` if given), by namespace and interface."""
        topo = self.s.topo
        eps = list(topo.endpoints.values())
        if network is not None:
            net_id = topo.find_network(network).id
            eps = [e for e in eps if e.network_id == net_id]
        return sorted(eps, key=lambda e: (e.netns, e.ifname))
