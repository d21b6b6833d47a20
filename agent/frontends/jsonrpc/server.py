"""The control socket: JSON-RPC 2.0, one JSON object per line, on a Unix stream socket.

This is the only place that turns errors into JSON-RPC errors: an `AgentError` becomes its
stable code and kind; anything unexpected becomes an internal error with an incident id that
the log also records, never a traceback on the wire.

Error handling: a malformed line gets a JSON-RPC error and the connection stays usable; an
oversized line (> `protocol.MAX_LINE`) gets an error and the connection is closed; a client that
does not read its answers for `SEND_TIMEOUT` seconds is dropped. No client can stop the server
or slow down another client.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import socket as stdsocket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
import trio

from agent.core.errors import AgentError
from agent.frontends.jsonrpc import protocol as p
from agent.log import get_logger

log = get_logger("agent.frontends.jsonrpc")

Handler = Callable[[p.Params], Awaitable[Any]]

SEND_TIMEOUT = 10.0
_PEERCRED = struct.Struct("3i")


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)


def _peer_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def peer_allowed(pid: int, uid: int, gid: int, group: int | None) -> bool:
    """Root, the daemon's own user, or a member of the socket's group."""
    if uid in (0, os.geteuid()):
        return True
    return group is not None and (gid == group or group in _peer_groups(pid))


class InFlight:
    """Counts requests between being read and being answered, so that shutdown can wait for
    every in-flight answer to be sent before it cancels the connections."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle = trio.Event() if self.count == 1 else self._idle

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until every request read so far is answered (the caller bounds the wait)."""
        await self._idle.wait()


class Stream:
    """A handler's result that keeps the connection: `first` is answered to the request, then
    each item of `items` is sent as a JSON-RPC notification `method` (events.subscribe)."""

    def __init__(self, first: Any, method: str, items: AsyncIterator[Any]) -> None:
        self.first = first
        self.method = method
        self.items = items


async def dispatch(handlers: dict[str, Handler], line: bytes) -> bytes | Stream | None:
    """Answer one request line; None for a notification (no id) that succeeded."""
    try:
        req, params = p.decode_request(line)
    except p.ProtocolError as exc:
        return p.encode_error(exc.request_id, exc.code, exc.message)
    structlog.contextvars.bind_contextvars(method=req.method, request_id=req.id)
    try:
        result = await handlers[req.method](params)
    except AgentError as exc:
        log.info("request.failed", kind=exc.kind, error=exc.message)
        return p.encode_error(req.id, exc.code, exc.message, exc.to_data())
    except Exception:
        incident = secrets.token_hex(6)
        log.exception("request.internal_error", incident=incident)
        return p.encode_error(
            req.id,
            p.INTERNAL_ERROR,
            f"internal error (incident {incident}, see agentd log)",
            {"kind": "internal", "incident": incident},
        )
    finally:
        structlog.contextvars.unbind_contextvars("method", "request_id")
    if isinstance(result, Stream):
        result.first = p.encode_result(req.id, result.first)
        return result
    if req.id is None:
        return None
    return p.encode_result(req.id, result)


class _Connection:
    def __init__(
        self, stream: trio.SocketStream, handlers: dict[str, Handler], inflight: InFlight
    ) -> None:
        self.stream = stream
        self.handlers = handlers
        self.inflight = inflight
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("client does not read its answers")

    async def serve(self) -> None:
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > p.MAX_LINE:
                    await self.send(
                        p.encode_error(
                            None, p.INVALID_REQUEST, f"request line longer than {p.MAX_LINE} bytes"
                        )
                    )
                    return
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return
                self.buf += chunk
                continue
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            if not line.strip():
                continue
            with self.inflight:
                answer = await dispatch(self.handlers, line)
                if not isinstance(answer, Stream) and answer is not None:
                    await self.send(answer)
            if isinstance(answer, Stream):
                await self.stream_out(answer)
                return

    async def stream_out(self, stream: Stream) -> None:
        """Send the stream until it ends or the client goes away (EOF or a broken pipe)."""
        await self.send(stream.first)
        async with trio.open_nursery() as nursery:

            async def watch_hangup() -> None:
                while await self.stream.receive_some(4096):
                    pass  # a subscriber has nothing more to say; EOF ends the stream
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_hangup)
            async with contextlib.aclosing(stream.items) as items:  # type: ignore[type-var]
                async for item in items:
                    await self.send(p.encode_notification(stream.method, item))
            await self.send(
                p.encode_notification(
                    f"{stream.method}.closed", {"reason": "too slow: events were dropped"}
                )
            )
            nursery.cancel_scope.cancel()


async def serve_api(
    handlers: dict[str, Handler],
    path: str,
    *,
    group: str | None = None,
    inflight: InFlight | None = None,
    activated: stdsocket.socket | None = None,
    on_connection: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `path` (mode 0660, group `group`) until cancelled; or, when systemd passed
    the listening socket (`activated`, see `agent.systemd`), serve on that one.
    `on_connection(+1)` and `(-1)` are called as connections open and close (metrics).

    Resource handling:
        The socket file is replaced if stale and removed on exit; an `activated` socket's
        file belongs to the socket unit and is left alone.
    """
    gid = grp.getgrnam(group).gr_gid if group else None
    counter = inflight or InFlight()
    owned = activated is None
    if activated is not None:
        sock = trio.socket.from_stdlib_socket(activated)
        path = sock.getsockname() or path
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o660)
        if gid is not None:
            os.chown(path, 0, gid)
        sock.listen(1024)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        pid, uid, peer_gid = peer_credentials(stream.socket)
        structlog.contextvars.bind_contextvars(peer_uid=uid, peer_pid=pid)
        if on_connection is not None:
            on_connection(1)
        try:
            if not peer_allowed(pid, uid, peer_gid, gid):
                log.warning("api.peer.refused", uid=uid, pid=pid)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(
                        p.encode_error(
                            None,
                            403,
                            "permission denied: not root nor in the socket's group",
                            {"kind": "permission"},
                        )
                    )
                return
            await _Connection(stream, handlers, counter).serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a broken client must never take the server down
            log.exception("api.connection.failed")
        finally:
            if on_connection is not None:
                on_connection(-1)
            with contextlib.suppress(Exception):
                await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, [listener])
            log.info("api.listening", socket=path, activated=not owned)
            task_status.started()
    finally:
        if owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
