"""JSON-RPC 2.0 over a Unix stream socket, one JSON object per line, typed with msgspec.

Pure: no I/O. The server decodes an envelope, looks the method up in `METHODS` and decodes its
params into the method's Struct (unknown fields refused); `handlers` converts them to core
values. Results are core values (`Network`, `Endpoint`, `Event`) or the views below.

Error codes: JSON-RPC's own for framing (-32700 parse, -32600 invalid request, -32601 unknown
method, -32602 invalid params, -32603 internal) and the `AgentError.code` of `agent.core.errors`
for application errors, with `data.kind` naming the error class.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agent.core.events import Event
from agent.core.model import Endpoint, Network

__all__ = ["METHODS", "Event"]  # Event: the core's, as the wire carries it

MAX_LINE = 1 << 20  # bytes; a longer request line is refused and the connection closed

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: the message for JSON nested past what the decoder follows (Python's recursion limit, ~1,000
#: levels; no request needs more than 3)
TOO_DEEP = "invalid request: JSON nested too deeply"


class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request's params."""


class Empty(Params):
    pass


class NetworkCreate(Params):
    name: str
    subnet: str | None = None
    gateway: str | None = None
    ip_range: str | None = None
    internal: bool = False
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    aux_addresses: dict[str, str] = msgspec.field(default_factory=dict)  # name -> IPv4 reserved
    ipv6: bool = False  # dual stack
    subnet6: str | None = None  # IPv6 CIDR (default: the next /64 of the host's ULA /48)
    gateway6: str | None = None
    #: driver options, `agent.core.options` (icc, ip-masquerade, bridge, mtu, and Docker's
    #: com.docker.network.* names): string values, as `--opt KEY=VALUE` gives them
    options: dict[str, str] = msgspec.field(default_factory=dict)


class NetworkRef(Params):
    network: str  # name, full id or unique id prefix


class NetworkRemove(Params):
    network: str
    force: bool = False


class NetworkFilter(Params):
    labels: list[str] = msgspec.field(default_factory=list)  # "K" or "K=V"


class EndpointConnect(Params):
    network: str
    netns: str  # name under /run/netns or an absolute path
    ip: str | None = None
    mac: str | None = None
    ports: list[str] = msgspec.field(default_factory=list)  # "[HOST_IP:]H[-E]:C[-E][/proto]"
    ip6: str | None = None  # static IPv6 address (dual-stack networks)
    ifname: str | None = None  # name inside the namespace (default: the next free ethN)
    attachment: str = ""  # the engine's key for the endpoint (CNI: CONTAINERID/IFNAME)
    aliases: list[str] = msgspec.field(default_factory=list)  # DNS names on the network


class EndpointReserve(Params):
    """Take an endpoint's addresses without a namespace (Docker's CreateEndpoint)."""

    network: str
    ip: str | None = None
    mac: str | None = None
    ports: list[str] = msgspec.field(default_factory=list)
    ip6: str | None = None
    attachment: str = ""
    aliases: list[str] = msgspec.field(default_factory=list)  # DNS names on the network


class EndpointAttach(Params):
    """Give a reserved endpoint its namespace (Docker's Join)."""

    endpoint: str  # id, unique id prefix, or attachment key
    netns: str
    ifname: str | None = None


class EndpointDisconnect(Params):
    network: str
    netns: str
    force: bool = False  # a namespace that is not connected is not an error


class EndpointRemove(Params):
    """Disconnect (or give up the reservation of) one endpoint, by id or attachment key."""

    endpoint: str
    force: bool = False  # an unknown endpoint is not an error


class EndpointFilter(Params):
    network: str | None = None


class SandboxRun(Params):
    name: str
    network: str = "bridge"
    ip: str | None = None
    mac: str | None = None
    ports: list[str] = msgspec.field(default_factory=list)
    ip6: str | None = None
    dns_name: str | None = None  # its DNS name (default: `name`)
    aliases: list[str] = msgspec.field(default_factory=list)  # more DNS names
    dns: list[str] = msgspec.field(default_factory=list)  # resolv.conf servers (default: gateway)


class PortChange(Params):
    """`port.publish` / `port.unpublish` on an existing endpoint; the result is the Endpoint."""

    netns: str
    ports: list[str]  # Docker's -p specs, e.g. "8080:80", "127.0.0.1:53:53/udp", "9000-9009:90-99"
    network: str | None = None  # needed when the namespace is on several networks


class SandboxRemove(Params):
    name: str


class CniExec(Params):
    """One CNI plugin call, forwarded unread by the plugin executable (`agent.frontends.cni`)."""

    env: dict[str, str] = msgspec.field(default_factory=dict)  # the CNI_* variables set
    stdin: str = ""  # the plugin's configuration, base64


class CniOutput(msgspec.Struct, kw_only=True):
    """What the plugin prints and its exit status. The clients read the encoded answer
    positionally: `{"jsonrpc":"2.0","id":ID,"result":{"exit":N,"out":JSON}}`, `out` being
    the bytes to print (null: nothing), so keep these two fields, in this order, last."""

    exit: int
    out: msgspec.Raw | None = None


class NetworkView(msgspec.Struct, kw_only=True):
    """What `network inspect` shows: the network and its endpoints."""

    network: Network
    endpoints: list[Endpoint]


class Removed(msgspec.Struct, kw_only=True):
    removed: list[str]


class EventFilter(Params):
    types: list[str] = msgspec.field(default_factory=list)  # "network", "endpoint", "repair"


class Subscribed(msgspec.Struct, kw_only=True):
    subscribed: bool = True


class ReconcileReport(msgspec.Struct, kw_only=True):
    repaired: list[str]  # one line per repair, e.g. "bridge br-1234 recreated"


class Info(msgspec.Struct, kw_only=True):
    version: str
    pid: int
    socket: str
    state_dir: str
    networks: int
    endpoints: int
    accelerated: bool  # Cython extensions in use
    firewall: str
    uptime_s: float
    pending_deletions: int = 0  # retired links the reaper has not deleted yet
    connections: int = 0  # open API connections (this one included)
    requests: int = 0  # requests answered since start
    request_errors: int = 0  # of which answered with an error
    repairs: int = 0  # repairs made by the reconciler since start
    metrics: str = ""  # the --metrics address ("" when not served)


class Ruleset(msgspec.Struct, kw_only=True):
    text: str
    rules: int


# method name -> params type; the result type is documented by the service's handler.
METHODS: dict[str, type[Params]] = {
    "system.info": Empty,
    "system.ruleset": Empty,
    "network.create": NetworkCreate,
    "network.list": NetworkFilter,
    "network.inspect": NetworkRef,
    "network.remove": NetworkRemove,
    "network.prune": NetworkFilter,
    "endpoint.connect": EndpointConnect,
    "endpoint.reserve": EndpointReserve,
    "endpoint.attach": EndpointAttach,
    "endpoint.disconnect": EndpointDisconnect,
    "endpoint.remove": EndpointRemove,
    "endpoint.list": EndpointFilter,
    "sandbox.run": SandboxRun,
    "sandbox.remove": SandboxRemove,
    "events.subscribe": EventFilter,
    "system.reconcile": Empty,
    "port.publish": PortChange,
    "port.unpublish": PortChange,
    "cni.exec": CniExec,
}


class Request(msgspec.Struct, kw_only=True):
    jsonrpc: str
    method: str
    id: int | str | None = None
    params: msgspec.Raw = msgspec.Raw(b"{}")


class ErrorBody(msgspec.Struct, kw_only=True):
    code: int
    message: str
    data: dict[str, Any] | None = None


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    jsonrpc: str = "2.0"
    id: int | str | None = None
    result: Any = None
    error: ErrorBody | None = None


class ProtocolError(Exception):
    """A framing error: the request could not be read as JSON-RPC at all."""

    def __init__(self, code: int, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(Request)
_response_decoder = msgspec.json.Decoder(Response)


def decode_request(line: bytes) -> tuple[Request, Params]:
    """Parse one request line into its envelope and typed params.

    Raises:
        ProtocolError: with the JSON-RPC code that fits (parse, invalid request, unknown
            method, invalid params); `request_id` is set when the envelope was readable.
    """
    try:
        req = _request_decoder.decode(line)
    except RecursionError as exc:  # msgspec's C decoder stops at Python's recursion limit
        raise ProtocolError(INVALID_REQUEST, TOO_DEEP) from exc
    except msgspec.DecodeError as exc:
        try:
            msgspec.json.decode(line)
        except msgspec.DecodeError:
            raise ProtocolError(PARSE_ERROR, f"parse error: {exc}") from exc
        except RecursionError:
            raise ProtocolError(INVALID_REQUEST, TOO_DEEP) from exc
        raise ProtocolError(INVALID_REQUEST, f"invalid request: {exc}") from exc
    if req.jsonrpc != "2.0":
        raise ProtocolError(INVALID_REQUEST, "invalid request: jsonrpc must be '2.0'", req.id)
    params_type = METHODS.get(req.method)
    if params_type is None:
        raise ProtocolError(METHOD_NOT_FOUND, f"method not found: {req.method!r}", req.id)
    try:
        params = msgspec.json.decode(req.params, type=params_type)
    except msgspec.DecodeError as exc:
        raise ProtocolError(INVALID_PARAMS, f"invalid params: {exc}", req.id) from exc
    except RecursionError as exc:
        raise ProtocolError(INVALID_PARAMS, TOO_DEEP, req.id) from exc
    return req, params


def encode_request(method: str, params: Params | None, request_id: int) -> bytes:
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
    return _encoder.encode(body) + b"\n"


class _Result(msgspec.Struct, kw_only=True):
    """A success response: `result` is always present, `null` included (JSON-RPC 2.0)."""

    jsonrpc: str = "2.0"
    id: int | str | None = None
    result: Any = None


def encode_result(request_id: int | str | None, result: Any) -> bytes:
    return _encoder.encode(_Result(id=request_id, result=result)) + b"\n"


def encode_error(
    request_id: int | str | None, code: int, message: str, data: dict[str, Any] | None = None
) -> bytes:
    err = ErrorBody(code=code, message=message, data=data)
    return _encoder.encode(Response(id=request_id, error=err)) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    """A JSON-RPC notification (no id): how `events.subscribe` streams its events."""
    return _encoder.encode({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n"


def decode_response(line: bytes) -> Response:
    return _response_decoder.decode(line)
