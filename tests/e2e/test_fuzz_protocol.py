"""Protocol fuzz against a running agentd (issue 17): garbage bytes, arbitrary JSON, JSON-RPC
envelopes with wrong types, and well-formed calls of every method with odd params, drawn by
Hypothesis for a bounded time (`BUDGET_S`).

Every message goes on its own connection, followed by end of stream (half-close), and every
line that comes back must be a well-formed JSON-RPC response that is not an internal error.
Afterwards agentd still answers, logged no traceback, and once what the fuzz created is
removed, the host namespace is exactly as before: no leaked link, address, rule, namespace.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.client import Client, decode_response
from tests.e2e.harness import addrs, routes, running_host, sh

pytestmark = pytest.mark.kernel

BUDGET_S = float(os.environ.get("NETAGENT_FUZZ_SECONDS", "20"))
MAX_MESSAGES = 2_000  # the budget usually ends it first; past it, examples cost ~1 ms each

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
PLAUSIBLE = [
    "bridge", "fz", "fz1", "10.66.0.0/24", "10.66.0.7", "fd00:66::/64", "127.0.0.0/8",
    "0.0.0.0/0", "224.0.0.0/4", "ff02::/64", "/proc/self/ns/net", "/proc/1/ns/net",
    "8080:80", "127.0.0.1:53:53/udp", "1-65535:1-65535", "br0\n", "x" * 300, "",
    "02:42:ac:11:00:02", "icc", "mtu", "9000", "../etc", "eth0", "network",
]  # fmt: skip
plausible = st.one_of(st.sampled_from(PLAUSIBLE), json_value)


def _params_of(method: str) -> st.SearchStrategy[dict]:
    fields = list(p.METHODS[method].__struct_fields__)
    values = st.one_of(plausible, st.lists(plausible, max_size=3))
    values = st.one_of(values, st.dictionaries(st.sampled_from(["mtu", "icc", "x"]), plausible))
    return st.dictionaries(st.sampled_from([*fields, "bogus"]), values, max_size=len(fields) + 1)


well_formed = st.sampled_from(sorted(p.METHODS)).flatmap(
    lambda m: st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "id": st.integers(0, 2**31), "method": st.just(m)},
        optional={"params": _params_of(m)},
    )
)
envelope = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.one_of(st.just("2.0"), json_value),
        "id": json_value,
        "method": st.one_of(st.sampled_from(sorted(p.METHODS)), json_value),
        "params": json_value,
    },
)
message = st.one_of(
    well_formed.map(lambda d: json.dumps(d).encode()),
    envelope.map(lambda d: json.dumps(d).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * (n % 3)),
)


def _exchange(path: str, payload: bytes) -> list[bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    try:
        s.connect(path)
        s.sendall(payload + b"\n")
        s.shutdown(socket.SHUT_WR)  # half-close: agentd answers, then ends the stream
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    assert not data or data.endswith(b"\n"), data[-200:]
    return data.splitlines()


def _host_state(host) -> tuple:
    host.settle()
    return (
        host.iptables_save(),
        sorted((a["ifname"], *(x["local"] for x in a["addr_info"])) for a in addrs(host.name)),
        sorted(json.dumps(r, sort_keys=True) for r in routes(host.name)),
        sh("ip", "netns", "list").stdout,
    )


def test_fuzzed_messages_never_crash_or_leak() -> None:
    with running_host() as host:
        baseline = _host_state(host)
        nets = {n["id"] for n in host.call("network.list", labels=[])}
        sent = [0]
        end = time.monotonic() + BUDGET_S

        @settings(
            max_examples=MAX_MESSAGES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(message)
        def one(payload: bytes) -> None:
            if time.monotonic() > end:
                return
            sent[0] += 1
            for line in _exchange(host.socket, payload):
                response = decode_response(line)
                error = response.get("error")
                if error is not None:
                    assert error["code"] != p.INTERNAL_ERROR, error
                    assert (error.get("data") or {}).get("kind") != "internal", error

        one()
        assert sent[0] > 50, f"only {sent[0]} messages in {BUDGET_S} s"
        assert host.proc.poll() is None
        log = host.log()
        for bad in ("Traceback", "request.internal_error", "api.connection.failed"):
            assert bad not in log, bad
        # remove what the fuzz managed to create, then nothing may be left over
        client = Client(host.socket, timeout=30)
        for ep in client.call("endpoint.list", {}):
            client.call("endpoint.remove", {"endpoint": ep["id"], "force": True})
        for net in client.call("network.list", {}):
            if net["id"] not in nets:
                client.call("network.remove", {"network": net["id"], "force": True})
        for line in sh("ip", "netns", "list").stdout.splitlines():
            name = line.split()[0]
            if name not in baseline[3]:
                client.call("sandbox.remove", {"name": name})
        assert _host_state(host) == baseline
        print(f"fuzz: {sent[0]} messages in {BUDGET_S:g} s, 0 crashes")
