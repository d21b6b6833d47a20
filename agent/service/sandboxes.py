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

import trio

from agent.core import naming, plan
from agent.core.errors import AgentError, Conflict, NotFound
from agent.core.model import Endpoint, Sandbox
from agent.service.context import Shared, undo
from agent.service.endpoints import Endpoints


class Sandboxes:
    """`run` and `rm` of named namespaces, and forgetting those deleted behind our back."""

    def __init__(self, shared: Shared, endpoints: Endpoints) -> None:
        self.s = shared
        self.endpoints = endpoints

    async def run(self, name: str, spec: plan.EndpointSpec) -> Endpoint:
        """Create /run/netns/NAME and connect it as `spec` says (its `netns` is ignored)."""
        s = self.s
        async with s.lock:
            naming.validate_netns_name(name)
            if name in s.topo.sandboxes:
                raise Conflict(f"sandbox {name!r} already exists", name=name)
            s.topo.find_network(spec.network)  # before anything is created
            path = await s.ns.create_named(name)
            try:
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
        await s.ns.delete_named(name)
        with s.store.transaction() as w:
            w.delete_sandbox(name)
        del s.topo.sandboxes[name]
        return True
