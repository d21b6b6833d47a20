"""The plugin socket (h11 on a Unix socket) with a recording handler: keep-alive, refusals of
what is not a POST of a reasonable body, garbage, and the socket file's life."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.frontends.docker import server
from agent.frontends.docker.server import serve_docker_plugin


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    async def __call__(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        self.calls.append((path, body))
        return 200, {"Path": path, "Length": len(body)}


@pytest.fixture
async def plugin_socket(tmp_path: Path, nursery: trio.Nursery) -> tuple[str, Recorder]:
    path = str(tmp_path / "plugins" / "netagent.sock")
    recorder = Recorder()
    await nursery.start(serve_docker_plugin, recorder, path)
    return path, recorder


async def exchange(path: str, data: bytes) -> bytes:
    """Send `data`, read until the server closes (the last request says Connection: close)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    stream = trio.SocketStream(sock)
    await stream.send_all(data)
    out = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            out += chunk
    await stream.aclose()
    return out


def post(path: str, body: bytes = b"{}", *, close: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return (
        f"POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\n".encode()
        + conn
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def test_keep_alive_requests_in_order(plugin_socket) -> None:
    path, recorder = plugin_socket
    two = post("/Plugin.Activate") + post("/NetworkDriver.Join", b'{"a":1}', close=True)
    out = await exchange(path, two)
    assert out.count(b"HTTP/1.1 200") == 2
    assert b"application/vnd.docker.plugins.v1.2+json" in out
    assert b'{"Path":"/NetworkDriver.Join","Length":7}' in out
    assert recorder.calls == [("/Plugin.Activate", b"{}"), ("/NetworkDriver.Join", b'{"a":1}')]


async def test_connection_close_is_honoured(plugin_socket) -> None:
    path, _ = plugin_socket
    out = await exchange(path, post("/Plugin.Activate", close=True))
    assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1") == 1


async def test_only_post(plugin_socket) -> None:
    path, recorder = plugin_socket
    out = await exchange(
        path, b"GET /Plugin.Activate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 405") and b'"Err":"only POST"' in out
    assert recorder.calls == []


async def test_a_body_too_large_is_refused(plugin_socket, monkeypatch) -> None:
    path, recorder = plugin_socket
    monkeypatch.setattr(server, "MAX_BODY", 1000)
    out = await exchange(path, post("/NetworkDriver.CreateNetwork", b"x" * 5000, close=True))
    assert out.startswith(b"HTTP/1.1 413")
    assert recorder.calls == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 nonsense\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST\r\n\r\n",
    ],
)
async def test_garbage_gets_400_and_the_server_goes_on(plugin_socket, garbage: bytes) -> None:
    path, recorder = plugin_socket
    out = await exchange(path, garbage)
    assert out.startswith(b"HTTP/1.1 400") and b'"Err"' in out
    assert recorder.calls == []
    out = await exchange(path, post("/Plugin.Activate", close=True))
    assert out.startswith(b"HTTP/1.1 200")


async def test_a_client_that_hangs_up_mid_request(plugin_socket) -> None:
    path, recorder = plugin_socket
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    await sock.send(post("/Plugin.Activate", b'{"long": true}')[:-5])
    sock.close()
    out = await exchange(path, post("/Plugin.Activate", close=True))
    assert out.startswith(b"HTTP/1.1 200") and len(recorder.calls) == 1


async def test_a_stale_socket_is_replaced_and_removed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "netagent.sock"
    path.write_text("stale")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_docker_plugin, Recorder(), str(path))
        assert path.is_socket() and oct(os.stat(path).st_mode & 0o777) == "0o660"
        nursery.cancel_scope.cancel()
    assert not path.exists()
