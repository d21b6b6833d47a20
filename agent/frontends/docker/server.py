"""The plugin socket: HTTP/1.1 (h11) on a Unix stream socket, in agentd's Trio loop.

dockerd 20.10 finds a plugin by its socket in `/run/docker/plugins/` (the driver's name is
the socket's basename) at the first use of `-d NAME`, and POSTs JSON to `/Plugin.Activate`,
`/NetworkDriver.*` and `/IpamDriver.*` over keep-alive connections. h11 does the HTTP (no
hand-written parsing); each request's body goes to `DockerPlugin.handle`, whose (status,
answer) is sent back as JSON with Docker's plugin media type.

Error handling: a request that is not HTTP gets 400 and the connection is closed; a body over
`MAX_BODY` gets 413; a method other than POST 405; the connection of a peer that is neither
root nor agentd's own user is closed unanswered. A broken connection never affects another
or the server.
"""

from __future__ import annotations

import contextlib
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import msgspec
import trio

from agent.frontends.jsonrpc.server import peer_allowed, peer_credentials
from agent.log import get_logger

log = get_logger("agent.frontends.docker")

Handle = Callable[[str, bytes], Awaitable[tuple[int, dict[str, Any]]]]
MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20
_CHUNK = 65536


async def serve_docker_plugin(
    handle: Handle, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `path` (mode 0660) until cancelled, answering each request with `handle`.

    Resource handling:
        The socket file is replaced if stale and removed on exit.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(128)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            pid, uid, gid = peer_credentials(stream.socket)
            if not peer_allowed(pid, uid, gid, None):
                log.warning("docker.peer.refused", uid=uid, pid=pid)
                return  # closed unanswered
            await _serve(stream, handle)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a broken client must never take the server down
            log.exception("docker.connection.failed")
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, connection, [trio.SocketListener(sock)])
            log.info("docker.listening", socket=path)
            task_status.started()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _serve(stream: trio.SocketStream, handle: Handle) -> None:
    """Requests of one connection, in order, until the client closes it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    while True:
        try:
            request = await _read(stream, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(stream, conn, exc.error_status_hint, {"Err": f"bad request: {exc}"})
            return
        if request is None:
            return
        target, body, status = request
        if status == 200:
            status, answer = await handle(target, body)
        else:
            answer = {"Err": "only POST" if status == 405 else "request body too large"}
        await _send(stream, conn, status, answer)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:  # the client is still sending (a body we refused)
            return


async def _read(stream: trio.SocketStream, conn: h11.Connection) -> tuple[str, bytes, int] | None:
    """(target, body, 200 or the refusal status) of the next request; None at a clean close."""
    target, method, body, too_big = "", b"", bytearray(), False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_CHUNK))
        elif isinstance(event, h11.Request):
            target, method = event.target.decode("latin-1"), event.method
        elif isinstance(event, h11.Data):
            too_big = too_big or len(body) + len(event.data) > MAX_BODY
            if not too_big:
                body += event.data
        elif isinstance(event, h11.EndOfMessage):
            status = 413 if too_big else 405 if method != b"POST" else 200
            return target, bytes(body), status
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, answer: Any) -> None:
    data = msgspec.json.encode(answer)
    headers = [("Content-Type", MEDIA_TYPE), ("Content-Length", str(len(data)))]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=data)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
