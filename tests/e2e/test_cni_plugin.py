"""The two plugin clients (C and Python) against a scripted agentd: the same request line
sent, the same bytes printed and the same status for every kind of answer (a result, a busy
or other JSON-RPC error, a connection closed or garbage). No kernel involved."""

from __future__ import annotations

import base64
import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e import cni_harness as ch

CONF = {"cniVersion": "1.0.0", "name": "n", "type": "netagent"}
ENV = {"container": "c1", "netns": "/run/netns/x", "ifname": "eth0"}


class Scripted:
    """A Unix socket that reads one line and answers `reply` (then closes)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.reply = b""
        self.hang_up = False  # close at once, reading nothing
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.hang_up:
                    continue
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.reply)


@pytest.fixture
def agentd(tmp_path: Path) -> Iterator[Scripted]:
    server = Scripted(tmp_path / "agent.sock")
    yield server
    server.sock.close()


ANSWERS = [
    ("result", b'{"jsonrpc":"2.0","id":1,"result":{"exit":0,"out":{"cniVersion":"1.0.0",'
               b'"ips":[]}}}\n', 0, b'{"cniVersion":"1.0.0","ips":[]}\n'),
    ("nothing to print", b'{"jsonrpc":"2.0","id":1,"result":{"exit":0,"out":null}}\n', 0, b""),
    ("a CNI error", b'{"jsonrpc":"2.0","id":1,"result":{"exit":1,"out":{"code":7}}}\n', 1,
     b'{"code":7}\n'),
    ("busy", b'{"id":1,"error":{"code":423,"message":"shutting \\"down\\"","data":{"kind":'
             b'"busy"}}}\n', 1, b'{"cniVersion":"1.0.0","code":11,"msg":"agentd is busy, try '
             b'again later","details":"shutting \\"down\\""}\n'),
    ("other error", b'{"id":1,"error":{"code":-32601,"message":"method not found"}}\n', 1,
     b'{"cniVersion":"1.0.0","code":999,"msg":"agentd refused the request","details":'
     b'"method not found"}\n'),
    ("closed", b"", 1, b'{"cniVersion":"1.0.0","code":11,"msg":"agentd closed the connection '
                       b'without an answer"}\n'),
    ("garbage", b"<html>\n", 1, b'{"cniVersion":"1.0.0","code":11,"msg":"agentd closed the '
                                b'connection without an answer"}\n'),
]  # fmt: skip


@pytest.mark.parametrize(("why", "reply", "status", "printed"), ANSWERS,
                         ids=[a[0] for a in ANSWERS])  # fmt: skip
def test_answers(agentd: Scripted, why: str, reply: bytes, status: int, printed: bytes) -> None:
    agentd.reply = reply
    conf = dict(CONF, socket=agentd.path)
    for plugin in ch.CLIENTS.values():
        assert ch.run(plugin, "ADD", conf, **ENV) == (status, printed), (why, plugin)
    native, python = agentd.requests
    assert native == python
    request = json.loads(native)
    assert request["method"] == "cni.exec" and request["id"] == 1
    assert request["params"]["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
    }
    assert json.loads(base64.b64decode(request["params"]["stdin"])) == conf


def test_agentd_hanging_up_mid_request_is_try_again(agentd: Scripted) -> None:
    """A configuration larger than agentd reads before it hangs up: the write fails (EPIPE,
    not a SIGPIPE death) and both clients say 11."""
    agentd.hang_up = True
    conf = json.dumps(dict(CONF, socket=agentd.path, pad="x" * (4 << 20))).encode()
    outs = [ch.run(plugin, "ADD", conf, **ENV) for plugin in ch.CLIENTS.values()]
    assert outs[0] == outs[1]
    status, out = outs[0]
    assert status == 1 and json.loads(out)["code"] == 11


@pytest.mark.parametrize("stdin", [b"", b"x", b"xy", b"xyz", bytes(range(256)) * 3])
def test_stdin_crosses_unread(agentd: Scripted, stdin: bytes) -> None:
    """Whatever the runtime wrote reaches agentd byte for byte (base64 of every length
    modulo 3), and odd environment values are escaped alike."""
    agentd.reply = b'{"jsonrpc":"2.0","id":1,"result":{"exit":0,"out":null}}\n'
    odd = {"extra_env": {"CNI_IFNAME": 'e"\\\n\t\x01\u00e9'}}
    for plugin in ch.CLIENTS.values():
        # no socket in a configuration that is not JSON: the default one, absent here
        assert ch.run(plugin, "DEL", stdin, container="c")[0] == 1
        conf = json.dumps(dict(CONF, socket=agentd.path)).encode() + b" " + stdin
        assert ch.run(plugin, "DEL", conf, container="c", **odd)[0] in (0, 1)
    native, python = agentd.requests[-2:]
    assert native == python
    assert json.loads(native)["params"]["env"]["CNI_IFNAME"] == 'e"\\\n\t\x01\u00e9'


replies = st.one_of(
    st.sampled_from([a[1] for a in ANSWERS]),
    st.binary(max_size=30).map(lambda b: b'{"jsonrpc":"2.0","id":1,"result":{"exit":' + b),
    st.binary(max_size=30).map(lambda b: b'{"id":1,"error":' + b),
    st.binary(max_size=20),
)
stdins = st.one_of(
    st.binary(max_size=30),
    st.tuples(st.sampled_from(['"cniVersion":"0.4.0"', '"cniVersion":""', '"x":[1,"}"]',
                               '"cniVersion":"1.\\u0030"', '"name":{"a":"b"}', '"cniVersion":7']),
              st.binary(max_size=6)).map(lambda t: b"{" + t[0].encode() + b"," + t[1]),
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["ADD", "DEL", "STATUS", "VERSION"]), stdins, replies)
def test_fuzz_both_clients_agree(command: str, stdin: bytes, reply: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = Scripted(Path(d) / "agent.sock")
        server.reply = reply
        try:
            # the socket: in the configuration if the scanner finds it, else the default
            conf = stdin.replace(b"{", b'{"socket":"' + server.path.encode() + b'",', 1)
            outs = [ch.run(plugin, command, conf, **ENV) for plugin in ch.CLIENTS.values()]
        finally:
            server.sock.close()
    assert outs[0] == outs[1]
