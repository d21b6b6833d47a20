"""The synchronous client of agentd's control socket, used by `agentctl`.

One JSON-RPC 2.0 request per line, one response per line, on a Unix stream socket. The
connection is opened on the first call and reused for the next ones; calls are strictly
sequential (one request in flight), so a response answers the request just sent.

Error handling: an application error on the wire (`error.data.kind`) is raised as the
`agent.core.errors` class of that kind, with the daemon's message and data; a JSON-RPC framing
error (negative code) or an unreadable response as `RemoteProtocolError`; a socket that cannot be
reached, a daemon that hangs up or does not answer in time as `DaemonUnavailable`.

Import cost matters here (agentctl starts in tens of milliseconds): stdlib, msgspec and the pure
`agent.api.protocol` / `agent.core` modules only. The socket is the C module `_socket`: the
`socket` wrapper spends about 2.5 ms of a 45 ms command building IntEnums and importing
`selectors`, and a blocking connect / sendall / recv is all this client needs.
"""

from __future__ import annotations

import _socket
import os
from collections.abc import Iterator
from typing import Any

import msgspec

from agent.api import protocol
from agent.core.errors import ERRORS_BY_KIND, AgentError

DEFAULT_SOCKET = "/run/netagent/agent.sock"
SOCKET_ENV = "NETAGENT_SOCKET"


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


def error_from_body(body: protocol.ErrorBody) -> AgentError:
    """Rebuild the exception a JSON-RPC error body stands for."""
    data = dict(body.data or {})
    if body.code < 0:
        exc: AgentError = RemoteProtocolError(body.message)
        data.setdefault("code", body.code)
    else:
        kind = data.pop("kind", None)
        cls = ERRORS_BY_KIND.get(kind, AgentError) if isinstance(kind, str) else AgentError
        exc = cls(body.message)
    # Set after construction: the daemon's data may hold a key named "message".
    exc.data = data
    return exc


class Client:
    """A blocking connection to agentd.

    Resource handling:
        The socket is opened lazily by the first `call` and kept until `close` (or the end of a
        `with` block). After a transport failure the connection is dropped; the next call
        reconnects.
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

    def call(self, method: str, params: msgspec.Struct | None = None) -> Any:
        """Send one request and return its decoded JSON result.

        Raises:
            AgentError: the subclass named by the error's `data.kind` (NotFound, Conflict...).
            RemoteProtocolError: a JSON-RPC framing error, or a response that is not one.
            DaemonUnavailable: the socket cannot be reached, or the daemon hung up or timed out.
        """
        request_id = self._next_id
        self._next_id += 1
        line = protocol.encode_request(method, params, request_id)  # type: ignore[arg-type]
        sock = self._sock or self._connect()
        try:
            sock.sendall(line)
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

    def stream(self, method: str, params: msgspec.Struct | None = None) -> Iterator[Any]:
        """Call a streaming method (`events.subscribe`): yields the params of each notification
        that follows the answer, until the daemon ends the stream or the caller stops."""
        self.call(method, params)
        sock = self._sock
        assert sock is not None
        sock.settimeout(None)  # events may be rare: wait for as long as it takes
        while (line := self._readline(sock)).endswith(b"\n"):
            note = msgspec.json.decode(line)
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
            response = protocol.decode_response(answer)
        except msgspec.DecodeError as exc:
            self.close()
            raise RemoteProtocolError(f"unreadable response from agentd: {exc}") from exc
        if response.error is not None:
            raise error_from_body(response.error)
        if response.id != request_id:
            self.close()
            raise RemoteProtocolError(
                f"response id {response.id!r} does not match request id {request_id}"
            )
        return response.result
