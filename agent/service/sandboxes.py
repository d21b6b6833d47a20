"""Agent-managed named namespaces: `run` makes one and connects it, `rm` undoes both.

A sandbox is recorded in the store before its endpoint, so that a crash in between leaves a
record that adoption checks against the namespace file, never a namespace nobody knows. `rm`
deletes the record first (a full disk then fails before anything changed), then releases the
endpoints and deletes the namespace, putting the record back if either fails. A crash after
the record went leaves endpoints that still name their sandbox (`Endpoint.sandbox`), from
which a rebuild restores it.
Both requests take the topology lock exclusively.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import trio

from agent.core import names, naming, plan
from agent.core.errors import AgentError, Conflict, NotFound
from agent.core.model import Endpoint, Sandbox
from agent.service.context import Shared, undo
from agent.service.endpoints import Endpoints


class Sandboxes:
    """`run` and `rm` of named namespaces, and forgetting those deleted behind our back."""

    def __init__(self, shared: Shared, endpoints: Endpoints) -> None:
        self.s = shared
        self.endpoints = endpoints

    async def run(self, name: str, spec: plan.EndpointSpec, dns: Sequence[str] = ()) -> Endpoint:
        """Create /run/netns/NAME and connect it as `spec` says (its `netns` is ignored).

        Its DNS name is `spec.name`, else NAME (when NAME is a valid DNS name). Its
        /etc/netns/NAME/resolv.conf names the `dns` servers, else the network's gateway when
        the network has DNS on (else none is written: the host's applies).
        """
        s = self.s
        async with s.lock:
            naming.validate_netns_name(name)
            if name in s.topo.sandboxes:
                raise Conflict(f"sandbox {name!r} already exists", name=name)
            net = s.topo.find_network(spec.network)  # before anything is created
            if spec.name is None and names.is_valid_name(name):
                spec = msgspec.structs.replace(spec, name=name)
            names.endpoint_names(spec.name, spec.aliases)  # refused before anything is made
            servers = list(dns) or ([net.gateway] if names.dns_enabled(net) else [])
            resolv = names.resolv_conf(servers)
            path = await s.ns.create_named(name)
            try:
                if resolv:
                    s.ns.write_resolv_conf(name, resolv)
                key = s.ns.netns_key(path)
                sb = Sandbox(name=name, path=path, netns_key=key)
                with s.store.transaction() as w:
                    w.put_sandbox(sb)
                try:
                    ep = await self.endpoints.connect_locked(spec, path, key, sandbox=name)
                except BaseException:
                    with s.store.transaction() as w:
                        w.delete_sandbox(name)
                    raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    s.ns.remove_resolv_conf(name)
                    await s.ns.delete_named(name)
                raise
            s.topo.sandboxes[name] = sb
            return ep

    async def remove(self, name: str) -> Sandbox:
        """Disconnect the sandbox everywhere and delete its namespace."""
        s = self.s
        async with s.lock:
            sb = s.topo.sandboxes.get(name)
            if sb is None:
                raise NotFound(f"sandbox {name!r} not found", name=name)

            async def record_back() -> None:
                with s.store.transaction() as w:
                    w.put_sandbox(sb)

            with trio.CancelScope(shield=True):
                with s.store.transaction() as w:  # first: a full disk fails here, unchanged
                    w.delete_sandbox(sb.name)
                try:
                    for ep in s.topo.endpoints_in(sb.netns_key):
                        await self.endpoints.release(ep)
                    await s.ns.delete_named(sb.name)
                except BaseException as exc:
                    await undo(exc, [record_back])
                    raise
                s.ns.remove_resolv_conf(sb.name)
            del s.topo.sandboxes[sb.name]
            return sb

    async def forget_if_gone(self, name: str) -> bool:
        """Forget sandbox `name` if its namespace no longer exists (deleted by hand); True if
        forgotten. The caller holds the topology lock exclusively."""
        s = self.s
        sb = s.topo.sandboxes.get(name)
        if sb is None:
            return False
        try:
            alive = s.ns.netns_key(sb.path) == sb.netns_key
        except AgentError:
            alive = False
        if alive:
            return False
        s.ns.remove_resolv_conf(name)
        await s.ns.delete_named(name)
        with s.store.transaction() as w:
            w.delete_sandbox(name)
        del s.topo.sandboxes[name]
        return True
