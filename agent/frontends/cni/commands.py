"""The CNI commands, run in agentd: one call (`spec.Call`) in, the service called, the
plugin's stdout and exit status out (`execute`).

Theory of operation. Each command is the service's existing request under CNI's names:
ADD is `endpoints.connect` with `ifname` = CNI_IFNAME and `attachment` = the pair
"CNI_CONTAINERID/CNI_IFNAME" (the network is created first when the configuration carries a
`subnet` and it does not exist yet); DEL is `endpoints.remove` of that attachment with `force`
(nothing to do is success); GC removes every attachment of the network that the runtime did
not list as valid; CHECK compares the attachment, its namespace, its host veth and the
addresses inside the namespace with prevResult; STATUS says whether ADD can work. Nothing is
decided here that the core or the service decides for every other front end.

Error handling: `spec.CniError` carries the spec's code; a service error (`AgentError`)
becomes one by its kind (`spec.CODE_OF_KIND`). Anything else reaches the JSON-RPC server,
which logs it with an incident id; the client then reports code 999.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec

from agent.core import plan
from agent.core.errors import AgentError, Conflict, InvalidArgument, NotFound
from agent.core.model import Endpoint, Network
from agent.frontends.cni import spec
from agent.frontends.cni.spec import Call, CniError
from agent.log import get_logger
from agent.service import Service

log = get_logger("agent.frontends.cni")

#: the label that marks a network ADD created from a configuration's `subnet`
CREATED_LABEL = "netagent.cni.created"


async def execute(svc: Service, env: dict[str, str], stdin: bytes) -> tuple[int, bytes | None]:
    """Run one plugin call: (exit status, what the plugin prints, or None for nothing)."""
    try:
        call = spec.parse(env, stdin)
        log.debug("cni.call", command=call.command, attachment=call.attachment)
        try:
            doc = await _run(svc, call)
        except AgentError as exc:
            raise CniError.of(exc) from exc
    except CniError as exc:
        log.info("cni.call.failed", code=exc.code, msg=exc.msg, details=exc.details)
        error = spec.error_doc(spec.version_of(stdin), exc)
        return 1, msgspec.json.encode(error)
    return 0, None if doc is None else msgspec.json.encode(doc)


async def _run(svc: Service, call: Call) -> dict[str, Any] | None:
    if call.command == "ADD":
        return await add(svc, call)
    if call.command == "DEL":
        await delete(svc, call)
    elif call.command == "CHECK":
        await check(svc, call)
    elif call.command == "GC":
        await gc(svc, call)
    elif call.command == "STATUS":
        status(svc, call)
    else:
        return spec.version_doc(call.version)
    return None


def _find(svc: Service, call: Call, *, check_subnet: bool = True) -> Network | None:
    """The configuration's network, or None; one with another subnet than the
    configuration's is refused (INVALID_CONFIG) unless `check_subnet` is false."""
    try:
        net = svc.topo.find_network(call.conf.network_name)
    except NotFound:
        return None
    subnet = call.conf.subnet
    if check_subnet and subnet is not None and _canonical(subnet) != net.subnet:
        raise CniError(
            spec.INVALID_CONFIG,
            f"network {net.name!r} exists with subnet {net.subnet}, not {subnet}",
        )
    return net


def _canonical(subnet: str) -> str:
    try:
        return str(ipaddress.ip_network(subnet, strict=False))
    except ValueError as exc:
        raise CniError(spec.INVALID_CONFIG, f"invalid subnet {subnet!r}") from exc


def _missing(call: Call) -> CniError:
    name = call.conf.network_name
    return CniError(
        spec.INVALID_CONFIG,
        f"network {name!r} does not exist",
        "create it (agentctl network create) or give `subnet` in the configuration",
    )


async def _network(svc: Service, call: Call) -> Network:
    """The configuration's network, created on first use when it carries a `subnet`
    (idempotent: a concurrent ADD that created it first wins, and this one uses it)."""
    net = _find(svc, call)
    if net is not None:
        return net
    conf = call.conf
    if conf.subnet is None:
        raise _missing(call)
    options = {} if conf.mtu is None else {"mtu": str(conf.mtu)}
    try:
        net_spec = plan.network_spec(
            conf.network_name, options, subnet=conf.subnet, gateway=conf.gateway,
            internal=conf.internal, ipv6=conf.ipv6, subnet6=conf.subnet6,
            labels={CREATED_LABEL: "true"},
        )  # fmt: skip
        return await svc.networks.create(net_spec)
    except Conflict:
        if (net := _find(svc, call)) is None:  # not a race on the name: a real conflict
            raise
        return net
    except InvalidArgument as exc:  # the configuration's subnet, gateway, mtu...
        raise CniError(spec.INVALID_CONFIG, exc.message, exc.kind) from exc


async def add(svc: Service, call: Call) -> dict[str, Any]:
    """Create CNI_IFNAME in CNI_NETNS on the network; the result in the call's version."""
    net = await _network(svc, call)
    ip, ip6 = spec.static_ips(call.conf)
    endpoint = plan.EndpointSpec(
        network=net.id,
        netns=call.netns,
        ip=ip,
        ip6=ip6,
        mac=call.conf.runtime_config.mac,
        ports=spec.port_mappings(call.conf),
        ifname=call.ifname,
        attachment=call.attachment,
    )
    ep = await svc.endpoints.connect(endpoint)
    return spec.add_result(call, net, ep)


async def delete(svc: Service, call: Call) -> None:
    """Release the attachment: success when there is nothing (left) to release. An
    attachment of another network than the configuration's is not this DEL's."""
    ep = svc.topo.endpoint_of_attachment(call.attachment)
    net = _find(svc, call, check_subnet=False)
    if ep is None or (net is not None and ep.network_id != net.id):
        return
    await svc.endpoints.remove(call.attachment, force=True)


async def gc(svc: Service, call: Call) -> None:
    """Release every attachment of the network not in `cni.dev/valid-attachments`."""
    valid = call.conf.valid_attachments
    if valid is None:
        raise CniError(spec.INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
    net = _find(svc, call, check_subnet=False)
    if net is None:
        return
    keep = {f"{a.container_id}/{a.ifname}" for a in valid}
    stale = [
        ep.attachment
        for ep in svc.topo.endpoints_of(net.id)
        if "/" in ep.attachment and ep.attachment not in keep
    ]
    for key in stale:
        await svc.endpoints.remove(key, force=True)
    if stale:
        log.info("cni.gc.complete", network=net.name, released=len(stale))


def status(svc: Service, call: Call) -> None:
    """Success when ADD can work: agentd answers, and the network exists or can be made."""
    if _find(svc, call) is None and call.conf.subnet is None:
        error = _missing(call)
        raise CniError(spec.UNAVAILABLE, error.msg, error.details)


def _addresses(net: Network, ep: Endpoint) -> set[str]:
    found = {f"{ep.ip}/{net.subnet.split('/')[1]}"}
    if ep.ip6 is not None and net.subnet6 is not None:
        found.add(f"{ep.ip6}/{net.subnet6.split('/')[1]}")
    return found


async def check(svc: Service, call: Call) -> None:
    """Success when the attachment is as prevResult says, in the kernel too."""
    expected = spec.prev_addresses(call)
    net = _find(svc, call)
    if net is None:
        raise _missing(call)
    ep = svc.topo.endpoint_of_attachment(call.attachment)
    if ep is None or ep.network_id != net.id:
        raise CniError(spec.CHECK_FAILED, f"no attachment {call.attachment} on {net.name}")
    ours = _addresses(net, ep)
    if expected != ours:
        raise CniError(
            spec.CHECK_FAILED,
            "prevResult's addresses differ",
            f"{sorted(expected)} != {sorted(ours)}",
        )
    if svc.shared.ns.netns_key(svc.shared.ns.resolve(call.netns)) != ep.netns_key:
        raise CniError(spec.CHECK_FAILED, f"{call.netns} is not the attachment's namespace")
    state = await svc.shared.kernel.link_state(ep.host_ifname)
    if state is None or not state[0]:
        raise CniError(spec.CHECK_FAILED, f"host interface {ep.host_ifname} is down or gone")
    inside = await svc.shared.kernel.addresses_in(call.netns, call.ifname)
    if inside is None:
        raise CniError(spec.CHECK_FAILED, f"{call.ifname} is gone from {call.netns}")
    if missing := ours - {str(ipaddress.ip_interface(a)) for a in inside}:
        raise CniError(spec.CHECK_FAILED, f"{call.ifname} lost {sorted(missing)}")
