"""Docker's plugin endpoints: each decodes its body (`wire`), converts it (`convert`) and calls
the service; `DockerPlugin.handle` is the one place that turns errors into `{"Err": ...}`.

Theory of operation (libnetwork's remote driver and IPAM protocols, as dockerd 20.10 uses them):
- CreateNetwork / DeleteNetwork: the agent network whose id is Docker's NetworkID.
- CreateEndpoint reserves the endpoint (`endpoints.reserve`: addresses and MAC taken, no
  namespace) under the attachment key EndpointID; Join gives it Docker's sandbox
  (`endpoints.attach(..., in_host=True)`: the veth pair is made in the host namespace and
  Docker moves the peer in); Leave and DeleteEndpoint remove it (`endpoints.remove`), and an
  endpoint that is already gone (Leave came first, the container's namespace vanished, or
  agentd lost it) is not an error: Docker retries removals.
- ProgramExternalConnectivity publishes `com.docker.network.portmap` as plain DNAT
  (`ports.publish`; Docker runs no docker-proxy for a remote driver), Revoke unpublishes.
- IPAM (`--ipam-driver netagent`): RequestPool proposes a subnet from the agent's pools
  (`networks.propose_subnet`), kept pending until the network exists or ReleasePool; the
  gateway is the pool's first host; RequestAddress proposes the address the network's bitmap
  allocator would give next (`endpoints.propose_address`), which the CreateEndpoint that
  follows reserves. Addresses go back to the pool with their endpoints (ReleaseAddress has
  nothing left to do).

Error handling: an `AgentError` becomes `{"Err": message}` and, as every service call is all or
nothing, changed nothing; undecodable JSON or a body of the wrong shape too; anything else is
logged with an incident id and answered as an internal error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from agent.core.errors import AgentError, InvalidArgument, NotFound
from agent.core.model import Endpoint
from agent.frontends.docker import convert, wire
from agent.log import get_logger
from agent.service import Service

log = get_logger("agent.frontends.docker")

Answer = dict[str, Any]
IMPLEMENTS = ["NetworkDriver", "IpamDriver"]
ADDRESS_SPACES = {"LocalDefaultAddressSpace": "netagent", "GlobalDefaultAddressSpace": "netagent"}


class DockerPlugin:
    """The endpoints (`routes`) over one `Service`, and the IPAM pools proposed but not yet
    used by a network (`pending`)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.pending: set[ipaddress.IPv4Network] = set()
        self.routes: dict[str, tuple[type[Any], Callable[[Any], Awaitable[Answer]]]] = {
            "/Plugin.Activate": (wire.Empty, self.activate),
            "/NetworkDriver.GetCapabilities": (wire.Empty, self.capabilities),
            "/NetworkDriver.CreateNetwork": (wire.CreateNetwork, self.create_network),
            "/NetworkDriver.DeleteNetwork": (wire.NetworkRef, self.delete_network),
            "/NetworkDriver.CreateEndpoint": (wire.CreateEndpoint, self.create_endpoint),
            "/NetworkDriver.DeleteEndpoint": (wire.EndpointRef, self.delete_endpoint),
            "/NetworkDriver.EndpointOperInfo": (wire.EndpointRef, self.endpoint_info),
            "/NetworkDriver.Join": (wire.Join, self.join),
            "/NetworkDriver.Leave": (wire.EndpointRef, self.delete_endpoint),
            "/NetworkDriver.ProgramExternalConnectivity": (wire.Connectivity, self.program),
            "/NetworkDriver.RevokeExternalConnectivity": (wire.EndpointRef, self.revoke),
            "/NetworkDriver.DiscoverNew": (wire.Discovery, self.nothing),
            "/NetworkDriver.DiscoverDelete": (wire.Discovery, self.nothing),
            "/IpamDriver.GetCapabilities": (wire.Empty, self.ipam_capabilities),
            "/IpamDriver.GetDefaultAddressSpaces": (wire.Empty, self.address_spaces),
            "/IpamDriver.RequestPool": (wire.RequestPool, self.request_pool),
            "/IpamDriver.ReleasePool": (wire.PoolRef, self.release_pool),
            "/IpamDriver.RequestAddress": (wire.RequestAddress, self.request_address),
            "/IpamDriver.ReleaseAddress": (wire.ReleaseAddress, self.nothing),
        }

    async def handle(self, path: str, body: bytes) -> tuple[int, Answer]:
        """(HTTP status, JSON answer) of a POST of `body` to `path`."""
        route = self.routes.get(path)
        if route is None:
            return 404, {"Err": f"unknown plugin endpoint {path!r}"}
        kind, call = route
        try:
            blank = body.strip() in (b"", b"null")  # Activate and friends may send no body
            req = msgspec.json.decode(b"{}" if blank else body, type=kind)
        except msgspec.ValidationError as exc:  # a subclass of DecodeError: first
            return 400, {"Err": f"{path}: invalid request: {exc}"}
        except msgspec.DecodeError as exc:
            return 400, {"Err": f"{path}: invalid JSON: {exc}"}
        started = time.perf_counter()
        try:
            answer = await call(req)
            ms = round((time.perf_counter() - started) * 1000, 2)
            log.debug("docker.request.complete", path=path, duration_ms=ms)
            return 200, answer
        except AgentError as exc:
            log.info("docker.request.refused", path=path, kind=exc.kind, error=exc.message)
            return 200, {"Err": exc.message}
        except Exception:
            incident = secrets.token_hex(6)
            log.exception("docker.request.internal_error", path=path, incident=incident)
            return 500, {"Err": f"internal error (incident {incident}, see agentd log)"}

    # -- network driver ---------------------------------------------------------------------

    async def activate(self, _: wire.Empty) -> Answer:
        return {"Implements": IMPLEMENTS}

    async def capabilities(self, _: wire.Empty) -> Answer:
        return {"Scope": "local", "ConnectivityScope": "local"}

    async def nothing(self, _: object) -> Answer:
        return {}

    async def create_network(self, req: wire.CreateNetwork) -> Answer:
        net = await self.svc.networks.create(convert.network_spec(req))
        self.pending.discard(ipaddress.IPv4Network(net.subnet))  # a pool of ours: used now
        return {}

    async def delete_network(self, req: wire.NetworkRef) -> Answer:
        with contextlib.suppress(NotFound):  # gone already: Docker retries removals
            await self.svc.networks.remove(req.NetworkID)
        return {}

    async def create_endpoint(self, req: wire.CreateEndpoint) -> Answer:
        ep = await self.svc.endpoints.reserve(convert.endpoint_spec(req))
        return convert.created_interface(req, ep.mac)

    async def delete_endpoint(self, req: wire.EndpointRef) -> Answer:
        """DeleteEndpoint and Leave: the endpoint goes whole (veth, ports, addresses)."""
        await self.svc.endpoints.remove(req.EndpointID, force=True)  # unknown: not an error
        return {}

    async def endpoint_info(self, req: wire.EndpointRef) -> Answer:
        return {"Value": {}}

    async def join(self, req: wire.Join) -> Answer:
        if not req.SandboxKey.startswith("/"):
            raise InvalidArgument(f"SandboxKey {req.SandboxKey!r} is not a path")
        ep = await self.svc.endpoints.attach(req.EndpointID, req.SandboxKey, in_host=True)
        net = self.svc.topo.networks[ep.network_id]
        answer: Answer = {"InterfaceName": {"SrcName": ep.ifname, "DstPrefix": "eth"}}
        if not net.internal:
            answer["Gateway"] = net.gateway
            if ep.ip6 is not None and net.gateway6:
                answer["GatewayIPv6"] = net.gateway6
        return answer

    async def program(self, req: wire.Connectivity) -> Answer:
        mappings = convert.port_mappings(req.Options)
        ep = self._endpoint(req.EndpointID)
        if ep is None:
            raise NotFound(f"endpoint {req.EndpointID[:12]} does not exist")
        new = [m for m in mappings if m not in ep.ports]  # a retry publishes nothing twice
        if new:
            await self.svc.ports.publish_endpoint(req.EndpointID, new)
        return {}

    async def revoke(self, req: wire.EndpointRef) -> Answer:
        ep = self._endpoint(req.EndpointID)
        if ep is not None and ep.ports:
            await self.svc.ports.unpublish_endpoint(req.EndpointID)
        return {}

    def _endpoint(self, endpoint_id: str) -> Endpoint | None:
        return self.svc.topo.endpoint_of_attachment(endpoint_id)

    # -- IPAM driver --------------------------------------------------------------------------

    async def ipam_capabilities(self, _: wire.Empty) -> Answer:
        return {"RequiresMACAddress": False}

    async def address_spaces(self, _: wire.Empty) -> Answer:
        return dict(ADDRESS_SPACES)

    async def request_pool(self, req: wire.RequestPool) -> Answer:
        if req.V6:
            raise InvalidArgument("netagent IPAM has no IPv6 pools: use Docker's IPAM for --ipv6")
        if req.SubPool:
            raise InvalidArgument("netagent IPAM does not take --ip-range", field="ip_range")
        subnet, _ = await self.svc.networks.propose_subnet(req.Pool or None, pending=self.pending)
        self.pending.add(subnet)
        return {"PoolID": str(subnet), "Pool": str(subnet), "Data": {}}

    async def release_pool(self, req: wire.PoolRef) -> Answer:
        with contextlib.suppress(ValueError):  # not a pool of ours: nothing to release
            self.pending.discard(ipaddress.IPv4Network(req.PoolID))
        return {}

    async def request_address(self, req: wire.RequestAddress) -> Answer:
        options = req.Options or {}
        gateway = options.get("RequestAddressType") == convert.GATEWAY_REQUEST
        address = req.Address
        if not gateway and not address:
            address = self.svc.endpoints.propose_address(self._network_of_pool(req.PoolID))
        cidr = convert.pool_address(req.PoolID, address, gateway=gateway)
        return {"Address": cidr, "Data": {}}

    def _network_of_pool(self, pool: str) -> str:
        for net in self.svc.topo.networks.values():
            if net.subnet == pool:
                return net.id
        raise NotFound(f"no network uses pool {pool!r} yet", pool=pool)
