"""agentctl and its socket client against a fake agentd (no root, no kernel).

The fake daemon is a threaded Unix-socket server that decodes every request with the real
`protocol.decode_request` (so a request the real server would refuse fails here too), records
it, and answers with a canned result or error per method.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.core.errors import AgentError, Busy, NotFound
from agent.frontends import cli
from agent.frontends.jsonrpc import client as client_mod
from agent.frontends.jsonrpc import protocol
from agent.frontends.jsonrpc.client import Client, DaemonUnavailable, RemoteProtocolError

ROOT = Path(__file__).resolve().parents[2]
NET_A = {
    "id": "a" * 64,
    "name": "frontend",
    "bridge": "br-aaaaaaaaaaaa",
    "subnet": "172.18.0.0/16",
    "gateway": "172.18.0.1",
    "labels": {"tier": "web"},
}
NET_B = {
    "id": "b" * 64,
    "name": "bridge",
    "bridge": "netagent0",
    "subnet": "172.17.0.0/16",
    "gateway": "172.17.0.1",
    "is_default": True,
}
EP_1 = {
    "id": "1" * 64,
    "network_id": "a" * 64,
    "netns": "/run/netns/web1",
    "netns_key": "4:4026532000",
    "ifname": "eth0",
    "host_ifname": "vethaaaa1111",
    "ip": "172.18.0.2",
    "mac": "02:42:ac:12:00:02",
    "sandbox": "web1",
}
EP_2 = {**EP_1, "network_id": "c" * 64, "netns": "/proc/42/ns/net", "sandbox": None}
EP_2 |= {"ifname": "eth1", "ip": "10.0.0.7", "host_ifname": "vethcccc2222"}


class Err(msgspec.Struct):
    """A canned JSON-RPC error answer."""

    code: int
    message: str
    data: dict[str, Any] | None = None


HANGUP = object()  # close the connection instead of answering
GARBAGE = object()  # answer a line that is not JSON


class FakeDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.connections = 0
        self.replies: dict[str, Any] = {}
        super().__init__(path, _Handler)

    def answer(self, method: str, params: dict[str, Any]) -> Any:
        reply = self.replies.get(method)
        return reply(params) if callable(reply) else reply

    @property
    def methods(self) -> list[str]:
        return [m for m, _ in self.requests]

    def params(self, method: str) -> list[dict[str, Any]]:
        return [p for m, p in self.requests if m == method]


class _Handler(socketserver.StreamRequestHandler):
    server: FakeDaemon

    def handle(self) -> None:
        self.server.connections += 1
        while line := self.rfile.readline():
            request, _ = protocol.decode_request(line)  # raises on anything the server refuses
            params = json.loads(bytes(request.params))
            self.server.requests.append((request.method, params))
            reply = self.server.answer(request.method, params)
            if reply is HANGUP:
                return
            if reply is GARBAGE:
                out = b"this is not json\n"
            elif isinstance(reply, Err):
                out = protocol.encode_error(request.id, reply.code, reply.message, reply.data)
            else:
                out = protocol.encode_result(request.id, reply)
            self.wfile.write(out)


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="agentctl-", dir="/tmp")  # AF_UNIX paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(sockdir: str) -> Iterator[FakeDaemon]:
    server = FakeDaemon(os.path.join(sockdir, "agent.sock"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run agentctl against the fake daemon: (exit status, stdout, stderr)."""

    def go(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["--socket", daemon.server_address, *argv])  # type: ignore[list-item]
        out, err = capsys.readouterr()
        return code, out, err

    return go


def _create_defaults(**fields: Any) -> dict[str, Any]:
    base = {"subnet": None, "gateway": None, "ip_range": None, "internal": False}
    base |= {"labels": {}, "aux_addresses": {}, "options": {}}
    base |= {"ipv6": False, "subnet6": None, "gateway6": None}
    return base | fields


# ---------------------------------------------------------------- params sent per command


def test_network_create_all_options(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["network.create"] = NET_A
    code, out, err = run(
        "network", "create", "--subnet", "10.5.0.0/16", "--gateway", "10.5.0.254",
        "--ip-range", "10.5.1.0/24", "--internal", "--opt", "icc=false",
        "--opt", "ip-masquerade=False", "--opt", "bridge=br-custom", "--opt", "mtu=1400",
        "--label", "tier=web", "--label", "team=", "--aux-address", "gw2=10.5.0.9", "frontend",
    )  # fmt: skip
    assert (code, out, err) == (0, "a" * 64 + "\n", "")
    assert daemon.requests == [
        (
            "network.create",
            {
                "name": "frontend",
                "subnet": "10.5.0.0/16",
                "gateway": "10.5.0.254",
                "ip_range": "10.5.1.0/24",
                "internal": True,
                "labels": {"tier": "web", "team": ""},
                "aux_addresses": {"gw2": "10.5.0.9"},
                "ipv6": False,
                "subnet6": None,
                "gateway6": None,
                "options": {
                    "icc": "false",
                    "ip-masquerade": "False",
                    "bridge": "br-custom",
                    "mtu": "1400",
                },
            },
        )
    ]


def test_network_create_minimal_and_docker_option_names(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["network.create"] = NET_A
    assert run("network", "create", "n1")[0] == 0
    assert run("network", "create", "--mtu", "9000", "n2")[0] == 0
    long_icc = "com.docker.network.bridge.enable_icc=false"
    assert (
        run("network", "create", "-o", long_icc, "--opt", "mtu=9000", "--mtu", "9000", "n3")[0] == 0
    )
    assert daemon.params("network.create") == [
        _create_defaults(name="n1"),
        _create_defaults(name="n2", options={"mtu": "9000"}),
        _create_defaults(name="n3", options={long_icc.split("=")[0]: "false", "mtu": "9000"}),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["network", "create", "--opt", "colour=blue", "n"],
        ["network", "create", "--opt", "icc", "n"],
        ["network", "create", "--opt", "icc=maybe", "n"],
        ["network", "create", "--opt", "mtu=big", "n"],
        ["network", "create", "--opt", "mtu=1400", "--mtu", "1500", "n"],
        ["network", "create", "--mtu", "big", "n"],
        ["network", "create", "--label", "=v", "n"],
        ["network", "create"],
        ["network", "ls", "--filter", "name=x"],
        ["network", "prune", "-f", "--filter", "label="],
        ["network", "inspect"],
        ["network", "connect", "net-only"],
        ["network"],
        ["network", "frobnicate"],
        ["frobnicate"],
        [],
        ["rm"],
        ["info", "extra"],
        ["--sock", "/x", "info"],  # no abbreviations: a typo must not pick another option
    ],
)
def test_usage_errors_exit_2_without_a_request(
    daemon: FakeDaemon, run: Run, argv: list[str]
) -> None:
    code, out, err = run(*argv)
    assert code == 2
    assert out == ""
    assert err.startswith("agentctl: ") and err.count("\n") == 1, err
    assert daemon.requests == []


def test_connect_disconnect_params(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["endpoint.connect"] = EP_1
    assert run("network", "connect", "--ip", "172.18.0.9", "--mac", "02:00:00:00:00:09",
               "frontend", "web1") == (0, "", "")  # fmt: skip
    assert run("network", "connect", "frontend", "/proc/42/ns/net") == (0, "", "")
    assert run("network", "disconnect", "-f", "frontend", "web1") == (0, "", "")
    assert run("network", "disconnect", "frontend", "web1") == (0, "", "")
    assert daemon.requests == [
        ("endpoint.connect",
         {"network": "frontend", "netns": "web1", "ip": "172.18.0.9", "mac": "02:00:00:00:00:09",
          "ports": [], "ip6": None, "ifname": None, "attachment": "", "aliases": []}),
        ("endpoint.connect",
         {"network": "frontend", "netns": "/proc/42/ns/net", "ip": None, "mac": None,
          "ports": [], "ip6": None, "ifname": None, "attachment": "", "aliases": []}),
        ("endpoint.disconnect", {"network": "frontend", "netns": "web1", "force": True}),
        ("endpoint.disconnect", {"network": "frontend", "netns": "web1", "force": False}),
    ]  # fmt: skip


def test_run_prints_ip_and_sends_defaults(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["sandbox.run"] = EP_1
    assert run("run", "web1") == (0, "172.18.0.2\n", "")
    assert run("run", "--network", "frontend", "--ip", "172.18.0.2", "--mac", "02:42:ac:12:00:02",
               "web1") == (0, "172.18.0.2\n", "")  # fmt: skip
    assert daemon.params("sandbox.run") == [
        {"name": "web1", "network": "bridge", "ip": None, "mac": None, "ports": [], "ip6": None,
         "dns_name": None, "aliases": [], "dns": []},
        {"name": "web1", "network": "frontend", "ip": "172.18.0.2", "mac": "02:42:ac:12:00:02",
         "ports": [], "ip6": None, "dns_name": None, "aliases": [], "dns": []},
    ]  # fmt: skip


def test_dns_flags(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["sandbox.run"] = EP_1
    daemon.replies["endpoint.connect"] = EP_1
    daemon.replies["network.create"] = {"id": "ab" * 32}
    assert run("run", "--network", "n1", "--name", "web", "--alias", "www", "--alias", "w2",
               "--dns", "9.9.9.9", "c1")[0] == 0  # fmt: skip
    assert run("network", "connect", "--alias", "db", "n1", "c2")[0] == 0
    assert run("network", "create", "--disable-dns", "quiet")[0] == 0
    assert run("network", "create", "--opt", "dns=false", "quiet2")[0] == 0
    (sent,) = daemon.params("sandbox.run")
    assert (sent["dns_name"], sent["aliases"], sent["dns"]) == ("web", ["www", "w2"], ["9.9.9.9"])
    assert daemon.params("endpoint.connect")[0]["aliases"] == ["db"]
    assert [r["options"] for r in daemon.params("network.create")] == [
        {"dns": "false"},
        {"dns": "false"},
    ]
    status, _, err = run("network", "create", "--disable-dns", "--opt", "dns=true", "x")
    assert status == 2 and "disagree" in err


def test_publish_flags_and_port_commands(daemon: FakeDaemon, run: Run) -> None:
    mapping = {"protocol": "udp", "host_port": 53, "container_port": 5353, "host_ip": "127.0.0.1"}
    daemon.replies["sandbox.run"] = EP_1
    daemon.replies["port.publish"] = {**EP_1, "ports": [mapping]}
    daemon.replies["port.unpublish"] = {**EP_1, "ports": []}
    assert run("run", "-p", "8080:80", "--publish", "127.0.0.1:53:5353/udp", "web1")[0] == 0
    assert run("port", "publish", "--network", "bridge", "web1", "127.0.0.1:53:5353/udp") == (
        0, "127.0.0.1:53->5353/udp\n", "")  # fmt: skip
    assert run("port", "unpublish", "web1", "8080:80") == (0, "", "")
    assert daemon.params("sandbox.run")[0]["ports"] == ["8080:80", "127.0.0.1:53:5353/udp"]
    assert daemon.params("port.publish") == [
        {"netns": "web1", "ports": ["127.0.0.1:53:5353/udp"], "network": "bridge"}
    ]
    assert daemon.params("port.unpublish") == [
        {"netns": "web1", "ports": ["8080:80"], "network": None}
    ]


def test_rm_continues_past_errors(daemon: FakeDaemon, run: Run) -> None:
    def remove(params: dict[str, Any]) -> Any:
        if params["name"] == "ghost":
            return Err(404, "no sandbox named 'ghost'", {"kind": "not_found"})
        return None

    daemon.replies["sandbox.remove"] = remove
    code, out, err = run("rm", "a", "ghost", "b")
    assert (code, out, err) == (3, "a\nb\n", "agentctl: no sandbox named 'ghost'\n")
    assert daemon.params("sandbox.remove") == [{"name": "a"}, {"name": "ghost"}, {"name": "b"}]


def test_network_rm_reports_first_failure(daemon: FakeDaemon, run: Run) -> None:
    def remove(params: dict[str, Any]) -> Any:
        if params["network"] == "busy":
            return Err(423, "network busy has 2 endpoints", {"kind": "busy", "endpoints": 2})
        if params["network"] == "ghost":
            return Err(404, "no network 'ghost'", {"kind": "not_found"})
        return {"removed": [params["network"]]}

    daemon.replies["network.remove"] = remove
    code, out, err = run("network", "rm", "n1", "busy", "ghost", "n2")
    assert code == 7
    assert out == "n1\nn2\n"
    assert err == "agentctl: network busy has 2 endpoints\nagentctl: no network 'ghost'\n"
    assert run("network", "rm", "-f", "n3")[0] == 0
    assert daemon.params("network.remove")[-1] == {"network": "n3", "force": True}
    assert daemon.params("network.remove")[0] == {"network": "n1", "force": False}


def test_network_prune(daemon: FakeDaemon, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon.replies["network.prune"] = {"removed": ["old1", "old2"]}
    assert run("network", "prune", "-f", "--filter", "label=tier=web") == (0, "old1\nold2\n", "")
    assert daemon.requests == [("network.prune", {"labels": ["tier=web"]})]
    monkeypatch.setattr(sys, "stdin", _Stdin("n\n"))
    code, out, err = run("network", "prune")
    assert (code, out) == (0, "")
    assert "Are you sure" in err
    assert len(daemon.requests) == 1  # declined: nothing sent
    monkeypatch.setattr(sys, "stdin", _Stdin("y\n"))
    assert run("network", "prune")[:2] == (0, "old1\nold2\n")
    assert daemon.requests[-1] == ("network.prune", {"labels": []})


class _Stdin:
    def __init__(self, text: str) -> None:
        self.text = text

    def readline(self) -> str:
        return self.text


# ---------------------------------------------------------------- human output


def test_network_ls_table(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["network.list"] = [NET_A, NET_B]
    code, out, err = run("network", "ls")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "NETWORK ID     NAME       DRIVER   SUBNET          GATEWAY      BRIDGE",
        "bbbbbbbbbbbb   bridge     bridge   172.17.0.0/16   172.17.0.1   netagent0",
        "aaaaaaaaaaaa   frontend   bridge   172.18.0.0/16   172.18.0.1   br-aaaaaaaaaaaa",
    ]
    assert run("network", "ls", "-q") == (0, "bbbbbbbbbbbb\naaaaaaaaaaaa\n", "")
    assert run("network", "ls", "--filter", "label=tier", "-f", "label=a=b")[0] == 0
    assert daemon.params("network.list") == [{"labels": []}, {"labels": []},
                                             {"labels": ["tier", "a=b"]}]  # fmt: skip


def test_network_ls_accepts_views(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["network.list"] = [{"network": NET_A, "endpoints": [EP_1]}]
    assert run("network", "ls", "-q") == (0, "aaaaaaaaaaaa\n", "")


def test_ps_table_names_networks_on_one_connection(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["endpoint.list"] = [EP_1, EP_2]
    daemon.replies["network.list"] = [NET_A, NET_B]
    code, out, err = run("ps", "--network", "frontend")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "NETNS             NETWORK        IFNAME   IP           MAC                 HOST IFNAME",
        "web1              frontend       eth0     172.18.0.2   02:42:ac:12:00:02   vethaaaa1111",
        "/proc/42/ns/net   cccccccccccc   eth1     10.0.0.7     02:42:ac:12:00:02   vethcccc2222",
    ]
    assert daemon.requests == [
        ("endpoint.list", {"network": "frontend"}),
        ("network.list", {"labels": []}),
    ]
    assert daemon.connections == 1


def test_ruleset_printed_exactly(daemon: FakeDaemon, run: Run) -> None:
    text = "*filter\n:NETAGENT - [0:0]\n-A NETAGENT -j RETURN\nCOMMIT\n"
    daemon.replies["system.ruleset"] = {"text": text, "rules": 1}
    assert run("ruleset") == (0, text, "")


def test_info(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["system.info"] = {
        "version": "0.1.0", "pid": 4242, "socket": "/run/netagent/agent.sock",
        "state_dir": "/var/lib/netagent", "networks": 3, "endpoints": 7, "accelerated": True,
        "firewall": "iptables-nft", "uptime_s": 3725.4,
    }  # fmt: skip
    code, out, err = run("info")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "Version:     0.1.0"
    assert "Accelerated: yes" in lines
    assert "Uptime:      1h2m5s" in lines
    assert len(lines) == 9


# ---------------------------------------------------------------- --json


@pytest.mark.parametrize(
    ("method", "result", "argv"),
    [
        ("system.info", {"version": "0.1.0", "pid": 1}, ["info", "--json"]),
        ("system.info", {"version": "0.1.0", "pid": 1}, ["--json", "info"]),
        ("network.create", NET_A, ["network", "create", "--json", "frontend"]),
        ("network.list", [NET_A, NET_B], ["network", "ls", "--json"]),
        ("network.prune", {"removed": ["x"]}, ["network", "prune", "-f", "--json"]),
        ("endpoint.connect", EP_1, ["network", "connect", "--json", "frontend", "web1"]),
        ("endpoint.disconnect", None, ["network", "disconnect", "--json", "frontend", "web1"]),
        ("sandbox.run", EP_1, ["run", "--json", "web1"]),
        ("endpoint.list", [EP_1, EP_2], ["ps", "--json"]),
        ("system.ruleset", {"text": "*filter\nCOMMIT\n", "rules": 0}, ["ruleset", "--json"]),
    ],
)
def test_json_output_is_the_raw_result(
    daemon: FakeDaemon, run: Run, method: str, result: Any, argv: list[str]
) -> None:
    daemon.replies[method] = result
    code, out, err = run(*argv)
    assert (code, err) == (0, "")
    assert json.loads(out) == result
    assert daemon.methods == [method]


def test_json_for_several_targets_is_a_list(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["sandbox.remove"] = {"removed": ["x"]}
    code, out, _ = run("rm", "--json", "a", "b")
    assert code == 0
    assert json.loads(out) == [{"removed": ["x"]}, {"removed": ["x"]}]


def test_inspect_prints_found_networks_and_fails_for_missing(daemon: FakeDaemon, run: Run) -> None:
    view = {"network": NET_A, "endpoints": [EP_1]}

    def inspect(params: dict[str, Any]) -> Any:
        if params["network"] == "frontend":
            return view
        return Err(404, f"no network {params['network']!r}", {"kind": "not_found"})

    daemon.replies["network.inspect"] = inspect
    code, out, err = run("network", "inspect", "frontend", "ghost")
    assert code == 3
    assert json.loads(out) == [view]
    assert out.startswith('[\n    {\n        "network": {')  # pretty, like docker inspect
    assert err == "agentctl: no network 'ghost'\n"
    assert run("network", "inspect", "ghost")[:2] == (3, "[]\n")


# ---------------------------------------------------------------- errors and exit codes


@pytest.mark.parametrize(
    ("code", "data", "status"),
    [
        (500, {"kind": "internal", "incident": "x1"}, 1),
        (404, {"kind": "not_found"}, 3),
        (409, {"kind": "conflict", "subnet": "10.0.0.0/8"}, 4),
        (400, {"kind": "invalid_argument"}, 5),
        (507, {"kind": "pool_exhausted"}, 6),
        (423, {"kind": "busy"}, 7),
        (502, {"kind": "kernel", "errno": 17}, 8),
        (503, {"kind": "firewall", "line": "-A X"}, 8),
        (599, {"kind": "from_the_future"}, 1),
        (500, None, 1),
        (protocol.METHOD_NOT_FOUND, None, 10),
        (protocol.INVALID_PARAMS, {"field": "name"}, 10),
    ],
)
def test_exit_code_per_error_kind(
    daemon: FakeDaemon, run: Run, code: int, data: dict[str, Any] | None, status: int
) -> None:
    daemon.replies["system.info"] = Err(code, "it went wrong\nsecond line", data)
    assert run("info") == (status, "", "agentctl: it went wrong second line\n")


def test_daemon_missing_exits_9(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "nothing.sock")
    assert cli.main(["--socket", path, "network", "ls"]) == 9
    assert capsys.readouterr() == (
        "",
        f"agentctl: cannot reach agentd at {path}: No such file or directory\n",
    )


def test_daemon_refusing_exits_9(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "dead.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)  # bound, never listening: connect() is refused
        assert cli.main(["--socket", path, "rm", "a", "b"]) == 9
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"agentctl: cannot reach agentd at {path}: Connection refused\n")


def test_socket_from_environment(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon.replies["system.ruleset"] = {"text": "x\n", "rules": 0}
    monkeypatch.setenv("NETAGENT_SOCKET", daemon.server_address)  # type: ignore[arg-type]
    assert cli.main(["ruleset"]) == 0
    assert capsys.readouterr().out == "x\n"


def test_hangup_is_unavailable_and_garbage_is_protocol(daemon: FakeDaemon, run: Run) -> None:
    daemon.replies["system.info"] = HANGUP
    code, _, err = run("info")
    assert code == 9 and "closed the connection" in err
    daemon.replies["system.info"] = GARBAGE
    code, _, err = run("info")
    assert code == 10 and err.startswith("agentctl: unreadable response from agentd")
    daemon.replies["system.info"] = ["not", "a", "dict"]
    code, _, err = run("info")
    assert code == 10 and err.startswith("agentctl: unexpected result from agentd")


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "9 agentd unavailable" in out and "10 protocol error" in out
    assert cli.main(["network", "create", "--help"]) == 0
    assert "--ip-range CIDR" in capsys.readouterr().out


def test_lazy_parser_matches_full_parser() -> None:
    argvs = [
        ["--socket", "/s", "--json", "network", "create", "--opt", "icc=false", "--label", "a=b",
         "--mtu", "1400", "--internal", "n"],
        ["network", "ls", "-q", "--filter", "label=x"],
        ["network", "rm", "-f", "a", "b"],
        ["network", "disconnect", "-f", "n", "ns"],
        ["--socket=/s", "run", "--network", "n", "--json", "x"],
        ["ps", "--network", "n", "--socket", "/t"],
        ["rm", "a", "b"],
        ["info"],
    ]  # fmt: skip
    for argv in argvs:
        lazy = cli.build_parser(cli._selected(argv)).parse_args(argv)
        full = cli.build_parser().parse_args(argv)
        assert vars(lazy) == vars(full), argv


# ---------------------------------------------------------------- the client itself


def test_client_reuses_one_connection_and_raises_typed_errors(daemon: FakeDaemon) -> None:
    daemon.replies["network.list"] = [NET_A]
    daemon.replies["network.inspect"] = Err(
        404, "no network 'x'", {"kind": "not_found", "message": "shadow", "network": "x"}
    )
    daemon.replies["network.remove"] = Err(423, "busy", {"kind": "busy"})
    with Client(daemon.server_address, timeout=5) as client:  # type: ignore[arg-type]
        assert client.call("network.list", protocol.NetworkFilter()) == [NET_A]
        assert client.call("network.list") == [NET_A]
        with pytest.raises(NotFound) as caught:
            client.call("network.inspect", protocol.NetworkRef(network="x"))
        assert caught.value.message == "no network 'x'"
        assert caught.value.data == {"message": "shadow", "network": "x"}
        with pytest.raises(Busy):
            client.call("network.remove", protocol.NetworkRemove(network="x"))
        daemon.replies["system.info"] = Err(protocol.METHOD_NOT_FOUND, "method not found")
        with pytest.raises(RemoteProtocolError) as proto:
            client.call("system.info")
        assert proto.value.kind == "protocol" and proto.value.data == {"code": -32601}
    assert daemon.connections == 1
    assert len(daemon.requests) == 5


def test_client_timeout_is_unavailable(sockdir: str) -> None:
    path = os.path.join(sockdir, "slow.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()  # accepts (backlog) but never answers
        with Client(path, timeout=0.2) as client, pytest.raises(DaemonUnavailable) as caught:
            client.call("system.info")
    assert "did not answer within 0.2 s" in caught.value.message
    assert isinstance(caught.value, AgentError) and caught.value.kind == "unavailable"


# ---------------------------------------------------------------- import purity and start-up


def _clean_env(tmp: str) -> dict[str, str]:
    # A bytecode cache like an installed package has (this environment disables writing one).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"PYTHONPYCACHEPREFIX": os.path.join(tmp, "pycache")}


def test_import_graph_is_stdlib_and_pure_modules(sockdir: str) -> None:
    script = (
        "import sys, json\n"
        "import agent.frontends.cli\n"
        "after_import = sorted(sys.modules)\n"
        "agent.frontends.cli.main(['--socket', sys.argv[1], 'network', 'ls'])\n"
        "print(json.dumps([after_import, sorted(sys.modules)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, os.path.join(sockdir, "none.sock")],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    after_import, after_run = json.loads(proc.stdout)
    allowed_agent = {"agent", "agent.frontends", "agent.frontends.cli",
                     "agent.frontends.cli.commands", "agent.frontends.cli.output",
                     "agent.frontends.jsonrpc", "agent.frontends.jsonrpc.client", "agent.core",
                     "agent.core.errors", "agent.core.options"}  # fmt: skip
    for modules in (after_import, after_run):
        top = {m.split(".")[0] for m in modules}
        assert not top & {"trio", "pyroute2", "structlog", "sqlite3", "_sqlite3", "outcome"}
        assert {m for m in modules if m.split(".")[0] == "agent"} <= allowed_agent
        # msgspec and the protocol's Structs cost ~14 ms: params travel as dicts (see below)
        assert "msgspec" not in modules
        assert "typing" not in modules  # ~4 ms: errors.py imports it for type checkers only
    assert "agent.frontends.jsonrpc.client" not in after_import  # lazily: --help skips it
    assert "agent.frontends.jsonrpc.client" in after_run


@pytest.mark.parametrize("method", sorted(protocol.METHODS))
def test_client_params_mirror_the_protocol(method: str) -> None:
    """`client.PARAMS` is a copy of the protocol's Structs: same fields, same defaults."""
    fields = msgspec.structs.fields(protocol.METHODS[method])
    expected = {
        f.name: client_mod.REQUIRED if f.required
        else (f.default_factory() if f.default is msgspec.NODEFAULT else f.default)
        for f in fields
    }  # fmt: skip
    assert client_mod.PARAMS[method] == expected
    required = {k for k, v in expected.items() if v is client_mod.REQUIRED}
    given = {k: f"v-{k}" if k != "ports" else ["80:80"] for k in required}
    built = client_mod.params(method, **given)
    # What the client sends decodes into the method's Struct and back to the same dict.
    assert msgspec.to_builtins(msgspec.convert(built, protocol.METHODS[method])) == built


def test_client_params_refuse_unknown_and_missing_fields() -> None:
    with pytest.raises(TypeError, match="unknown params"):
        client_mod.params("network.list", label=["x"])
    with pytest.raises(TypeError, match="missing param 'name'"):
        client_mod.params("network.create")
    with pytest.raises(KeyError):
        client_mod.params("network.frobnicate")
    a, b = client_mod.params("network.list"), client_mod.params("network.list")
    a["labels"].append("x")
    assert b == {"labels": []} and client_mod.PARAMS["network.list"] == {"labels": []}


def test_client_encodes_structs_and_dicts_alike() -> None:
    struct = protocol.NetworkCreate(name="n", labels={"a": "é"}, options={"mtu": "1400"})
    as_dict = client_mod.params(
        "network.create", name="n", labels={"a": "é"}, options={"mtu": "1400"}
    )
    line = client_mod.encode_request("network.create", struct, 7)
    assert line == client_mod.encode_request("network.create", as_dict, 7)
    assert line == protocol.encode_request("network.create", struct, 7)  # byte for byte
    request, decoded = protocol.decode_request(line)
    assert (request.method, request.id, decoded) == ("network.create", 7, struct)


@pytest.mark.parametrize(
    "line",
    [
        b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}\n',
        b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":2}}\n',
        b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","data":[1]}}\n',
        b'{"jsonrpc":"2.0","id":1,"error":"boom"}\n',
        b'{"jsonrpc":"2.0","id":[1],"result":1}\n',
        b"[1]\n",
        b"\xff\n",
    ],
)
def test_malformed_responses_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ValueError):
        client_mod.decode_response(line)
    client = Client("/nonexistent")
    with pytest.raises(RemoteProtocolError, match="unreadable response from agentd"):
        client._result(line, 1)


def test_startup_time(daemon: FakeDaemon, sockdir: str) -> None:
    daemon.replies["system.info"] = {"version": "0.1.0", "pid": 1}
    script = "import sys; from agent.frontends.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", script, "--socket", daemon.server_address, "info"]
    env = _clean_env(sockdir)
    base_cmd = [sys.executable, "-c", "pass"]

    def wall(argv: list[str]) -> float:
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return time.perf_counter() - start

    wall(cmd)  # warm the bytecode cache
    runs = [wall(cmd) for _ in range(7)]
    bare = [wall(base_cmd) for _ in range(7)]
    print(
        f"\nagentctl info wall: min {min(runs) * 1e3:.1f} ms, median "
        f"{statistics.median(runs) * 1e3:.1f} ms; bare python: min {min(bare) * 1e3:.1f} ms"
    )
    assert statistics.median(runs) < 1.0
