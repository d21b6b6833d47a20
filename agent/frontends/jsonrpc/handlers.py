"""JSON-RPC methods: each converts its params to core values and calls the service.

The table `build` returns has exactly the protocol's methods (tests check it). Nothing here
decides anything: port specs are parsed by `agent.core.ports`, network options by
`agent.core.options` (through `plan.network_spec`), everything else by the service.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from agent.core import plan, ports
from agent.core.errors import InvalidArgument
from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.server import Handler, Stream
from agent.service import Service
from agent.service.reconcile import Reconciler


def network_spec(params: p.NetworkCreate) -> plan.NetworkSpec:
    """The core's spec of a `network.create` request."""
    return plan.network_spec(
        params.name,
        params.options,
        subnet=params.subnet,
        gateway=params.gateway,
        ip_range=params.ip_range,
        internal=params.internal,
        ipv6=params.ipv6,
        subnet6=params.subnet6,
        gateway6=params.gateway6,
        labels=dict(params.labels),
        aux_addresses=dict(params.aux_addresses),
    )


def endpoint_spec(
    params: p.EndpointConnect | p.EndpointReserve | p.SandboxRun,
) -> plan.EndpointSpec:
    """The core's spec of a `endpoint.connect|reserve` or `sandbox.run` request."""
    spec = plan.EndpointSpec(
        network=params.network,
        ip=params.ip,
        ip6=params.ip6,
        mac=params.mac,
        ports=tuple(ports.parse_all(params.ports)),
        aliases=tuple(params.aliases),
    )
    if isinstance(params, p.SandboxRun):
        spec = msgspec.structs.replace(spec, name=params.dns_name)
    if isinstance(params, p.EndpointConnect):
        return msgspec.structs.replace(
            spec, netns=params.netns, ifname=params.ifname, attachment=params.attachment
        )
    if isinstance(params, p.EndpointReserve):
        return msgspec.structs.replace(spec, attachment=params.attachment)
    return spec


def build(svc: Service, reconciler: Reconciler, info: Callable[[], p.Info]) -> dict[str, Handler]:
    """Method name -> coroutine taking the typed params (see `protocol.METHODS`)."""
    shared = svc.shared

    async def system_info(_: p.Empty) -> p.Info:
        return info()

    async def system_ruleset(_: p.Empty) -> p.Ruleset:
        return p.Ruleset(text=shared.firewall.text(), rules=shared.firewall.rule_count())

    async def system_reconcile(_: p.Empty) -> p.ReconcileReport:
        return p.ReconcileReport(repaired=await reconciler.reconcile())

    async def events_subscribe(params: p.EventFilter) -> Stream:
        return Stream(p.Subscribed(), "event", shared.bus.subscribe(params.types))

    async def network_create(params: p.NetworkCreate) -> Any:
        return await svc.networks.create(network_spec(params))

    async def network_list(params: p.NetworkFilter) -> Any:
        return svc.networks.filter(params.labels)

    async def network_inspect(params: p.NetworkRef) -> p.NetworkView:
        net, endpoints = svc.networks.inspect(params.network)
        return p.NetworkView(network=net, endpoints=endpoints)

    async def network_remove(params: p.NetworkRemove) -> p.Removed:
        net = await svc.networks.remove(params.network, force=params.force)
        return p.Removed(removed=[net.name])

    async def network_prune(params: p.NetworkFilter) -> p.Removed:
        return p.Removed(removed=[n.name for n in await svc.networks.prune(params.labels)])

    async def endpoint_connect(params: p.EndpointConnect) -> Any:
        return await svc.endpoints.connect(endpoint_spec(params))

    async def endpoint_reserve(params: p.EndpointReserve) -> Any:
        return await svc.endpoints.reserve(endpoint_spec(params))

    async def endpoint_attach(params: p.EndpointAttach) -> Any:
        return await svc.endpoints.attach(params.endpoint, params.netns, ifname=params.ifname)

    async def endpoint_disconnect(params: p.EndpointDisconnect) -> Any:
        return await svc.endpoints.disconnect(params.network, params.netns, force=params.force)

    async def endpoint_remove(params: p.EndpointRemove) -> Any:
        return await svc.endpoints.remove(params.endpoint, force=params.force)

    async def endpoint_list(params: p.EndpointFilter) -> Any:
        return svc.endpoints.filter(params.network)

    async def sandbox_run(params: p.SandboxRun) -> Any:
        return await svc.sandboxes.run(params.name, endpoint_spec(params), params.dns)

    async def sandbox_remove(params: p.SandboxRemove) -> p.Removed:
        return p.Removed(removed=[(await svc.sandboxes.remove(params.name)).name])

    async def port_publish(params: p.PortChange) -> Any:
        mappings = ports.parse_all(params.ports)
        return await svc.ports.publish(params.netns, mappings, network=params.network)

    async def port_unpublish(params: p.PortChange) -> Any:
        mappings = ports.parse_all(params.ports)
        return await svc.ports.unpublish(params.netns, mappings, network=params.network)

    async def cni_exec(params: p.CniExec) -> p.CniOutput:
        from agent.frontends.cni import commands as cni

        try:
            stdin = base64.b64decode(params.stdin, validate=True)
        except ValueError as exc:
            raise InvalidArgument("cni.exec: stdin is not base64", field="stdin") from exc
        status, out = await cni.execute(svc, params.env, stdin)
        return p.CniOutput(exit=status, out=None if out is None else msgspec.Raw(out))

    table: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "system.info": system_info,
        "system.ruleset": system_ruleset,
        "system.reconcile": system_reconcile,
        "events.subscribe": events_subscribe,
        "network.create": network_create,
        "network.list": network_list,
        "network.inspect": network_inspect,
        "network.remove": network_remove,
        "network.prune": network_prune,
        "endpoint.connect": endpoint_connect,
        "endpoint.reserve": endpoint_reserve,
        "endpoint.attach": endpoint_attach,
        "endpoint.disconnect": endpoint_disconnect,
        "endpoint.remove": endpoint_remove,
        "endpoint.list": endpoint_list,
        "sandbox.run": sandbox_run,
        "sandbox.remove": sandbox_remove,
        "port.publish": port_publish,
        "port.unpublish": port_unpublish,
        "cni.exec": cni_exec,
    }
    return table
