"""The synchronous client of agentd's control socket, used by `agentctl`.

One JSON-RPC 2.0 request per line, one response per line, on a Unix stream socket. The
connection is opened on the first call and reused for the next ones; calls are strictly
sequential (one request in flight), so a response answers the request just sent.

Error handling: an application error on the wire (`error.data.kind`) is raised as the
`agent.core.errors` class of that kind, with the daemon's message and data; a JSON-RPC framing
error (negative code) or an unreadable response as `RemoteProtocolError`; a socket that cannot be
reached, a daemon that hangs up or does not answer in time as `DaemonUnavailable`.

Import cost matters here (agentctl's whole budget is ~40 ms, of which the interpreter takes
~25): stdlib `json` and `agent.core.errors` only. msgspec and the protocol module cost ~14 ms
to import (msgspec pulls in datetime, decimal, uuid, typing...), so params travel as plain
dicts built by `params()` from `PARAMS`, a copy of the protocol's Structs that the tests check
field by field against `protocol.METHODS` (the source of truth). msgspec Structs are still
accepted by `Client.call` (converted with `msgspec.to_builtins`; whoever built one has paid for
msgspec already). The socket is the C module `_socket`: the `socket` wrapper spends ~2.5 ms
building IntEnums and importing `selectors`; a blocking connect / sendall / recv is all we need.
"""

from __future__ import annotations

import _socket
import json
import os

from agent.core.errors import ERRORS_BY_KIND, AgentError, PermissionDenied

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` costs ~2 ms at run time; annotations are strings here
    from collections.abc import Iterator
    from typing import Any

DEFAULT_SOCKET = "/run/netagent/agent.sock"
SOCKET_ENV = "NETAGENT_SOCKET"
REQUIRED = "<required>"  # a field without a default in PARAMS

_NET = {"network": REQUIRED}
# method -> {field: default}, mirroring `protocol.METHODS` (checked by the tests).
PARAMS: dict[str, dict[str, Any]] = {
    "system.info": {},
    "system.ruleset": {},
    "system.reconcile": {},
    "network.create": {
        "name": REQUIRED,
        "subnet": None,
        "gateway": None,
        "ip_range": None,
        "internal": False,
        "labels": {},
        "aux_addresses": {},
        "ipv6": False,
        "subnet6": None,
        "gateway6": None,
        "options": {},
    },
    "network.list": {"labels": []},
    "network.inspect": _NET,
    "network.remove": {**_NET, "force": False},
    "network.prune": {"labels": []},
    "endpoint.connect": {
        **_NET,
        "netns": REQUIRED,
        "ip": None,
        "mac": None,
        "ports": [],
        "ip6": None,
        "ifname": None,
        "attachment": "",
        "aliases": [],
    },
    "endpoint.reserve": {
        **_NET,
        "ip": None,
        "mac": None,
        "ports": [],
        "ip6": None,
        "attachment": "",
        "aliases": [],
    },
    "endpoint.attach": {"endpoint": REQUIRED, "netns": REQUIRED, "ifname": None},
    "endpoint.disconnect": {**_NET, "netns": REQUIRED, "force": False},
    "endpoint.remove": {"endpoint": REQUIRED, "force": False},
    "endpoint.list": {"network": None},
    "sandbox.run": {
        "name": REQUIRED,
        "network": "bridge",
        "ip": None,
        "mac": None,
        "ports": [],
        "ip6": None,
        "dns_name": None,
        "aliases": [],
        "dns": [],
    },
    "sandbox.remove": {"name": REQUIRED},
    "events.subscribe": {"types": []},
    "port.publish": {"netns": REQUIRED, "ports": REQUIRED, "network": None},
    "port.unpublish": {"netns": REQUIRED, "ports": REQUIRED, "network": None},
    "cni.exec": {"env": {}, "stdin": ""},
}


class RemoteProtocolError(AgentError):
    """The daemon refused the request's framing, or its answer was not valid JSON-RPC."""

    code = 0
    kind = "protocol"


class DaemonUnavailable(AgentError):
    """agentd cannot be reached: no socket, connection refused, hang-up or timeout."""

    code = 0
    kind = "unavailable"


def default_socket() -> str:
    """The socket path to use when none is given: `$NETAGENT_SOCKET`, else `DEFAULT_SOCKET`."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def params(method: str, **fields: Any) -> dict[str, Any]:
    """The params of `method` as a dict: every field, the given ones over the defaults.

    Raises:
        KeyError: `method` is not a method of the protocol.
        TypeError: a field the method does not have, or a required one missing.
    """
    spec = PARAMS[method]
    unknown = fields.keys() - spec.keys()
    if unknown:
        raise TypeError(f"{method}: unknown params {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, default in spec.items():
        if name in fields:
            out[name] = fields[name]
        elif default is REQUIRED:
            raise TypeError(f"{method}: missing param {name!r}")
        else:
            out[name] = default.copy() if isinstance(default, (dict, list)) else default
    return out


def error_from_body(body: Any) -> AgentError:
    """Rebuild the exception a JSON-RPC error body (`{code, message, data}`) stands for."""
    data = dict(body.get("data") or {})
    if body["code"] < 0:
        exc: AgentError = RemoteProtocolError(body["message"])
        data.setdefault("code", body["code"])
    else:
        kind = data.pop("kind", None)
        cls = ERRORS_BY_KIND.get(kind, AgentError) if isinstance(kind, str) else AgentError
        exc = cls(body["message"])
    # Set after construction: the daemon's data may hold a key named "message".
    exc.data = data
    return exc


def encode_request(method: str, params: Any, request_id: int) -> bytes:
    """One request line; `params` is a dict, a msgspec Struct or None (no params)."""
    if params is None:
        params = {}
    elif hasattr(params, "__struct_fields__"):
        import msgspec  # already loaded by whoever built the Struct

        params = msgspec.to_builtins(params)
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode_response(line: bytes) -> dict[str, Any]:
    """A response line as a dict with `id` and either `result` or a well-formed `error`.

    Raises:
        ValueError: not JSON, or not the shape of a JSON-RPC response.
    """
    response = json.loads(line)
    if not isinstance(response, dict):
        raise ValueError(f"expected an object, got {type(response).__name__}")
    if not isinstance(response.get("id"), (int, str, type(None))):
        raise ValueError("bad id")
    error = response.get("error")
    if error is not None:
        ok = isinstance(error, dict) and isinstance(error.get("message"), str)
        code = error.get("code") if ok else None
        if not ok or not isinstance(code, int) or isinstance(code, bool):
            raise ValueError(f"malformed error object: {error!r}")
        if not isinstance(error.get("data"), (dict, type(None))):
            raise ValueError(f"malformed error data: {error['data']!r}")
    return response


def _hung_up(sock: _socket.socket) -> bool:
    """True if the daemon has closed this (idle) connection: end of stream is pending."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # with a timeout, recv would first wait for data
    try:
        return sock.recv(1, _socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


class Client:
    """A blocking connection to agentd.

    Resource handling:
        The socket is opened lazily by the first `call` and kept until `close` (or the end of a
        `with` block). After a transport failure the connection is dropped; the next call
        reconnects, and so does a call on a connection agentd closed while it was idle.
    """

    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, if open. Idempotent."""
        self._buffer.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> _socket.socket:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except PermissionError as exc:  # the socket file's mode or group keeps us out
            sock.close()
            raise PermissionDenied(
                f"permission denied: cannot connect to agentd at {self.path} (not root nor in "
                "the socket's group?)",
                socket=self.path,
            ) from exc
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise DaemonUnavailable(
                f"cannot reach agentd at {self.path}: {reason}", socket=self.path
            ) from exc
        self._sock = sock
        return sock

    def _readline(self, sock: _socket.socket) -> bytes:
        """The next line from the daemon, with its newline; shorter only at end of stream."""
        buffer, start = self._buffer, 0
        while (end := buffer.find(b"\n", start)) < 0:
            chunk = sock.recv(1 << 16)
            if not chunk:
                line = bytes(buffer)
                buffer.clear()
                return line
            start = len(buffer)
            buffer += chunk
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        return line

    def call(self, method: str, params: Any = None) -> Any:
        """Send one request and return its decoded JSON result.

        Args:
            method: a name of `agent.frontends.jsonrpc.protocol.METHODS`.
            params: a dict (see `params()`), the method's msgspec Struct, or None for none.

        Raises:
            AgentError: the subclass named by the error's `data.kind` (NotFound, Conflict...).
            RemoteProtocolError: a JSON-RPC framing error, or a response that is not one.
            DaemonUnavailable: the socket cannot be reached, or the daemon hung up or timed out.
        """
        request_id = self._next_id
        self._next_id += 1
        line = encode_request(method, params, request_id)
        if self._sock is not None and _hung_up(self._sock):
            self.close()  # agentd closed the idle connection: nothing was sent on it yet
        sock = self._sock or self._connect()
        try:
            try:
                sock.sendall(line)
            except OSError:
                # agentd may have answered and closed before reading (a refused peer is
                # told why): that answer comes first
                answer = self._readline(sock)
                if answer.endswith(b"\n"):
                    return self._result(answer, request_id)
                raise
            answer = self._readline(sock)
        except TimeoutError as exc:
            self.close()
            raise DaemonUnavailable(
                f"agentd at {self.path} did not answer within {self.timeout:g} s",
                socket=self.path,
            ) from exc
        except OSError as exc:
            self.close()
            raise DaemonUnavailable(
                f"lost connection to agentd at {self.path}: {exc.strerror or exc}",
                socket=self.path,
            ) from exc
        if not answer.endswith(b"\n"):
            self.close()
            raise DaemonUnavailable(
                f"agentd at {self.path} closed the connection", socket=self.path
            )
        return self._result(answer, request_id)

    def stream(self, method: str, params: Any = None) -> Iterator[Any]:
        """Call a streaming method (`events.subscribe`): yields the params of each notification
        that follows the answer, until the daemon ends the stream or the caller stops."""
        self.call(method, params)
        sock = self._sock
        assert sock is not None
        sock.settimeout(None)  # events may be rare: wait for as long as it takes
        while (line := self._readline(sock)).endswith(b"\n"):
            note = json.loads(line)
            if note.get("method", "").endswith(".closed"):
                raise DaemonUnavailable(
                    f"agentd ended the stream: {note.get('params', {}).get('reason', '?')}",
                    socket=self.path,
                )
            yield note.get("params")
        self.close()
        raise DaemonUnavailable(f"agentd at {self.path} closed the connection", socket=self.path)

    def _result(self, answer: bytes, request_id: int) -> Any:
        try:
            response = decode_response(answer)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            self.close()
            raise RemoteProtocolError(f"unreadable response from agentd: {exc}") from exc
        if response.get("error") is not None:
            raise error_from_body(response["error"])
        if response.get("id") != request_id:
            self.close()
            raise RemoteProtocolError(
                f"response id {response.get('id')!r} does not match request id {request_id}"
            )
        return response.get("result")
