"""Bad input gets a clear error and changes nothing: links, addresses, rules, state."""

from __future__ import annotations

import contextlib
import socket

import pytest

from agent.core import errors
from tests.e2e.harness import addrs, running_host, sh, unique

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def host(backend: str):  # one host per firewall backend
    with running_host() as h:
        h.ctl("network", "create", "--subnet", "10.70.0.0/24", "taken")
        h.ns_name = unique("bad-")
        sh("ip", "netns", "add", h.ns_name)
        h.call("endpoint.connect", network="taken", netns=h.ns_name)  # gets 10.70.0.2
        yield h
        sh("ip", "netns", "del", h.ns_name, check=False)


def _state(host) -> tuple:
    return (
        host.iptables_save(),
        # links and their addresses (not operstate: a new bridge goes UNKNOWN -> UP by itself)
        sorted((a["ifname"], *(x["local"] for x in a["addr_info"])) for a in addrs(host.name)),
        sorted(n["id"] for n in host.call("network.list", labels=[])),
        sorted((e["id"], e["ip"]) for e in host.call("endpoint.list")),
        sh("ip", "netns", "list").stdout,
    )


CASES = [
    ("duplicate name", "network.create", {"name": "taken"}, errors.Conflict),
    (
        "overlapping subnet",
        "network.create",
        {"name": "o", "subnet": "10.70.0.128/25"},
        errors.Conflict,
    ),
    (
        "malformed subnet",
        "network.create",
        {"name": "m", "subnet": "10.0.0.300/24"},
        errors.InvalidArgument,
    ),
    (
        "host bits set",
        "network.create",
        {"name": "h", "subnet": "10.80.0.1/24"},
        errors.InvalidArgument,
    ),
    (
        "gateway outside",
        "network.create",
        {"name": "g", "subnet": "10.81.0.0/24", "gateway": "10.82.0.1"},
        errors.InvalidArgument,
    ),
    (
        "ip-range outside",
        "network.create",
        {"name": "r", "subnet": "10.83.0.0/24", "ip_range": "10.84.0.0/25"},
        errors.InvalidArgument,
    ),
    (
        "bridge name too long",
        "network.create",
        {"name": "l", "options": {"bridge": "averyveryverylongbridge"}},
        errors.InvalidArgument,
    ),
    ("bad network name", "network.create", {"name": "bad name"}, errors.InvalidArgument),
    (
        "bad mtu",
        "network.create",
        {"name": "mtu", "options": {"mtu": "10"}},
        errors.InvalidArgument,
    ),
    (
        "unknown option",
        "network.create",
        {"name": "o", "options": {"x": "1"}},
        errors.InvalidArgument,
    ),
    (
        "bridge name ending in a newline",
        "network.create",
        {"name": "nl", "options": {"bridge": "br0\n"}},
        errors.InvalidArgument,
    ),
    ("unknown network", "endpoint.connect", {"network": "nope", "netns": "x"}, errors.NotFound),
    (
        "missing namespace",
        "endpoint.connect",
        {"network": "taken", "netns": "no-such-ns"},
        errors.NotFound,
    ),
    (
        "ip taken",
        "endpoint.connect",
        {"network": "taken", "netns": "@", "ip": "10.70.0.2"},
        errors.Conflict,
    ),
    (
        "ip outside subnet",
        "endpoint.connect",
        {"network": "bridge", "netns": "@", "ip": "10.70.0.9"},
        errors.InvalidArgument,
    ),
    (
        "ip is the gateway",
        "endpoint.connect",
        {"network": "bridge", "netns": "@", "ip": "172.17.0.1"},
        errors.InvalidArgument,
    ),
    (
        "bad mac",
        "endpoint.connect",
        {"network": "bridge", "netns": "@", "mac": "01:00:5e:00:00:01"},
        errors.InvalidArgument,
    ),
    ("connect twice", "endpoint.connect", {"network": "taken", "netns": "@"}, errors.Conflict),
    ("rm with endpoints", "network.remove", {"network": "taken"}, errors.Busy),
    ("rm default", "network.remove", {"network": "bridge"}, errors.InvalidArgument),
    ("rm unknown", "network.remove", {"network": "nope"}, errors.NotFound),
    (
        "disconnect unknown",
        "endpoint.disconnect",
        {"network": "bridge", "netns": "@"},
        errors.NotFound,
    ),
    (
        "run unknown network",
        "sandbox.run",
        {"name": "zz-unused", "network": "nope"},
        errors.NotFound,
    ),
    ("rm unknown sandbox", "sandbox.remove", {"name": "nope"}, errors.NotFound),
]


@pytest.mark.parametrize(("what", "method", "params", "error"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_changes_nothing(host, what, method, params, error) -> None:
    params = {k: (host.ns_name if v == "@" else v) for k, v in params.items()}
    before = _state(host)
    with pytest.raises(error) as info:
        host.call(method, **params)
    assert info.value.message  # a sentence for the user
    assert _state(host) == before


def test_garbage_on_the_socket_is_answered_and_the_daemon_stays_up(host) -> None:
    before = _state(host)
    s = socket.socket(socket.AF_UNIX)
    s.connect(host.socket)
    f = s.makefile("rwb")
    for line, code in [
        (b"this is not json\n", -32700),
        (b'{"jsonrpc": "2.0", "id": 1}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": 2, "method": "no.such"}\n', -32601),
        (
            b'{"jsonrpc": "2.0", "id": 3, "method": "network.create", "params": {"nme": 1}}\n',
            -32602,
        ),
        (b"[1, 2, 3]\n", -32600),
    ]:
        f.write(line)
        f.flush()
        assert f'"code":{code}'.encode() in f.readline()
    # an oversized line: an error, then the connection is closed
    s.settimeout(10)
    # the server answers, then closes: our send may break, the answer is still queued for us
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(b"x" * (2 << 20))
    assert b"-32600" in s.recv(65536)
    s.close()
    assert host.call("system.info")["networks"] == 2
    assert _state(host) == before
