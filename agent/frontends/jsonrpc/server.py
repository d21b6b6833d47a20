"""The control socket: JSON-RPC 2.0, one JSON object per line, on a Unix stream socket.

This is the only place that turns errors into JSON-RPC errors: an `AgentError` becomes its
stable code and kind; anything unexpected becomes an internal error with an incident id that
the log also records, never a traceback on the wire.

Error handling: a malformed line gets a JSON-RPC error and the connection stays usable; an
oversized line (> `protocol.MAX_LINE`) gets an error and the connection is closed; a client that
does not read its answers for `SEND_TIMEOUT` seconds is dropped. No client can stop the server
or slow down another client.

Limits (`agent.frontends.jsonrpc.limits`): at `Limits.connections`, a new connection closes
the one idle the longest (`IdleSet`), or, if every one is busy, is told "too many
connections"; a connection idle for `Limits.idle_timeout` is closed; accept() out of
descriptors backs off; each request gets a deadline for beginning its kernel work
(`agent.core.deadline`); a request read from a client that has already hung up is not run
(nobody could read its answer); log lines about client errors are rate-limited per peer. A
refused peer is sent its error before the connection closes.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import select
import socket as stdsocket
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import structlog
import trio

from agent.core import deadline
from agent.core.errors import AgentError, Busy, PermissionDenied
from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.limits import (
    ACCEPT_CAPACITY_ERRNOS,
    Claimed,
    Limits,
    LogLimiter,
    accept_backoff,
    claim_socket,
)
from agent.log import get_logger

log = get_logger("agent.frontends.jsonrpc")

Handler = Callable[[p.Params], Awaitable[Any]]

SEND_TIMEOUT = 10.0
REFUSE_TIMEOUT = 1.0  # seconds to hand a refused peer its error before closing
_PEERCRED = struct.Struct("3i")
_limiter = LogLimiter()


def log_limited(event: str, peer: int, level: str = "warning", **fields: Any) -> None:
    """Log `event` unless this peer (its uid) has repeated it past the rate limit."""
    dropped = _limiter.allow((event, peer), time.monotonic())
    if dropped is None:
        return
    if dropped:
        fields["suppressed"] = dropped
    getattr(log, level)(event, **fields)


def hung_up(sock: trio.socket.SocketType) -> bool:
    """True if the peer has closed its end entirely (POLLHUP): no answer can reach it."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


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


async def dispatch(
    handlers: dict[str, Handler], line: bytes, request_timeout: float | None = None
) -> bytes | Stream | None:
    """Answer one request line; None for a notification (no id) that succeeded.

    With `request_timeout`, the request's kernel work must begin within that many seconds
    (`agent.core.deadline`), else it fails with Busy and changes nothing.
    """
    try:
        req, params = p.decode_request(line)
    except p.ProtocolError as exc:
        log_limited("request.malformed", _peer_uid(), "info", code=exc.code, error=exc.message)
        return p.encode_error(exc.request_id, exc.code, exc.message)
    structlog.contextvars.bind_contextvars(method=req.method, request_id=req.id)
    bound = None
    if request_timeout is not None:
        bound = deadline.Deadline(time.monotonic() + request_timeout, request_timeout)
    token = deadline.CURRENT.set(bound)
    try:
        result = await handlers[req.method](params)
    except AgentError as exc:
        log_limited("request.failed", _peer_uid(), "info", kind=exc.kind, error=exc.message)
        return p.encode_error(req.id, exc.code, exc.message, exc.to_data())
    except Exception:
        incident = secrets.token_hex(6)
        log_limited("request.internal_error", _peer_uid(), "exception", incident=incident)
        return p.encode_error(
            req.id,
            p.INTERNAL_ERROR,
            f"internal error (incident {incident}, see agentd log)",
            {"kind": "internal", "incident": incident},
        )
    finally:
        deadline.CURRENT.reset(token)
        structlog.contextvars.unbind_contextvars("method", "request_id")
    if isinstance(result, Stream):
        result.first = p.encode_result(req.id, result.first)
        return result
    if req.id is None:
        return None
    return p.encode_result(req.id, result)


class IdleSet:
    """Connections waiting for their next request with nothing buffered, oldest first: at the
    connection limit, the oldest idle one makes room for a new client (nginx reuses idle
    keep-alive connections the same way), so idle clients cannot lock fresh ones out."""

    def __init__(self) -> None:
        self._scopes: OrderedDict[int, trio.CancelScope] = OrderedDict()
        self.evicted: set[int] = set()

    @contextlib.contextmanager
    def waiting(self, scope: trio.CancelScope) -> Iterator[None]:
        self._scopes[id(scope)] = scope
        try:
            yield
        finally:
            self._scopes.pop(id(scope), None)

    def evict_oldest(self) -> bool:
        """Close the connection idle the longest; False if none is idle."""
        if not self._scopes:
            return False
        key, scope = self._scopes.popitem(last=False)
        self.evicted.add(key)
        scope.cancel()
        return True


def _peer_uid() -> int:
    """The uid bound to this connection's log context (-1 outside a connection)."""
    uid = structlog.contextvars.get_contextvars().get("peer_uid", -1)
    return uid if isinstance(uid, int) else -1


class _Connection:
    def __init__(
        self,
        stream: trio.SocketStream,
        handlers: dict[str, Handler],
        inflight: InFlight,
        limits: Limits,
        idle: IdleSet,
    ) -> None:
        self.stream = stream
        self.handlers = handlers
        self.inflight = inflight
        self.limits = limits
        self.idle = idle
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
                chunk = b""
                with trio.move_on_after(self.limits.idle_timeout) as scope:
                    with self.idle.waiting(scope) if not self.buf else contextlib.nullcontext():
                        chunk = await self.stream.receive_some(65536)
                if id(scope) in self.idle.evicted:  # closed even if a request just came in:
                    self.idle.evicted.discard(id(scope))  # its slot is given away (not run)
                    log_limited("api.connection.evicted", _peer_uid(), "info")
                    return
                if scope.cancelled_caught:
                    log_limited("api.connection.idle", _peer_uid(), "info",
                                timeout_s=self.limits.idle_timeout)  # fmt: skip
                    return
                if not chunk:
                    return
                self.buf += chunk
                continue
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            if not line.strip():
                continue
            if hung_up(self.stream.socket):  # the client gave up: its answer has no reader
                log_limited("request.abandoned", _peer_uid(), "warning")
                return
            with self.inflight:
                answer = await dispatch(self.handlers, line, self.limits.request_timeout)
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


async def _refuse(stream: trio.SocketStream, error: AgentError) -> None:
    """Send a refused peer its error, then close (never waiting on it for long)."""
    with trio.move_on_after(REFUSE_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(p.encode_error(None, error.code, error.message, error.to_data()))
            await stream.send_eof()  # the answer, then end of stream: never a reset
    with contextlib.suppress(Exception):
        await stream.aclose()


async def serve_api(
    handlers: dict[str, Handler],
    path: str,
    *,
    group: str | None = None,
    inflight: InFlight | None = None,
    limits: Limits | None = None,
    listener: Claimed | None = None,
    on_connection: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `path` (mode 0660, group `group`) until cancelled; `listener`: the socket
    already bound and listening there (`limits.claim_socket`, or systemd's socket, see
    `agent.systemd`), else it is claimed here. `on_connection(+1)` and `(-1)` are called as
    connections open and close (metrics).

    Resource handling:
        A dead socket file at `path` is replaced; a live one (another process answers on it)
        is left alone and `limits.SocketInUse` raised. On exit the socket file is removed
        only if it is still the one this server bound.
    """
    gid = grp.getgrnam(group).gr_gid if group else None
    counter = inflight or InFlight()
    limits = limits or Limits()
    most = limits.connections
    claimed = listener or claim_socket(path, group)
    try:
        sock = trio.socket.from_stdlib_socket(claimed.sock)
    except BaseException:
        claimed.release()
        raise
    active = 0
    idle = IdleSet()

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        pid, uid, peer_gid = peer_credentials(stream.socket)
        structlog.contextvars.bind_contextvars(peer_uid=uid, peer_pid=pid)
        if on_connection is not None:
            on_connection(1)
        try:
            if not peer_allowed(pid, uid, peer_gid, gid):
                log_limited("api.peer.refused", uid, uid=uid, pid=pid)
                denied = PermissionDenied("permission denied: not root nor in the socket's group")
                await _refuse(stream, denied)
                return
            await _Connection(stream, handlers, counter, limits, idle).serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a broken client must never take the server down
            incident = secrets.token_hex(6)
            log_limited("api.connection.failed", uid, "exception", incident=incident)
        finally:
            active -= 1
            if on_connection is not None:
                on_connection(-1)
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def accept_loop(nursery: trio.Nursery) -> None:
        nonlocal active
        pause = 0.0
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                pause = accept_backoff(pause)
                log_limited("api.accept.exhausted", -1, error=exc.strerror, pause_s=pause)
                await trio.sleep(pause)
                continue
            pause = 0.0
            stream = trio.SocketStream(conn)
            if active >= most and not idle.evict_oldest():  # every connection is busy
                log_limited("api.connections.refused", -1, limit=most)
                full = Busy(f"too many connections (agentd's limit is {most}); retry later")
                nursery.start_soon(_refuse, stream, full)
                continue
            active += 1
            nursery.start_soon(handle, stream)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, nursery)
            log.info("api.listening", socket=path, max_connections=most,
                     idle_timeout_s=limits.idle_timeout,
                     activated=claimed.identity is None)  # fmt: skip
            task_status.started()
    finally:
        sock.close()
        claimed.release()
