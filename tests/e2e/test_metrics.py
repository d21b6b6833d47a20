"""`agentd --metrics`: Prometheus text scraped with curl inside the private namespace, read with
prometheus-client's own parser; the values move with what agentd does. Also the audit line
per mutation, and `agentctl info`'s headline figures."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.client import Client
from agent.frontends.jsonrpc.observe import READ_ONLY
from agent.metrics import MAX_SCRAPERS, AddressError, parse_address
from tests.e2e.harness import VENV_BIN, Host, ns_exec, running_host, sh, unique

PORT = 9464


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(host: Host, path: str = "/metrics") -> dict[tuple[str, frozenset], float]:
    r = ns_exec(host.name, "curl", "-sf", f"http://127.0.0.1:{PORT}{path}")
    return _samples(r.stdout)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


REQUESTS = "netagent_request_duration_seconds_count"
KERNEL = "netagent_kernel_call_duration_seconds_count"
FIREWALL = "netagent_firewall_transaction_duration_seconds_count"


@pytest.mark.kernel
def test_metrics_move_with_requests_kernel_firewall_and_repairs() -> None:
    with running_host("--metrics", f"127.0.0.1:{PORT}") as host:
        before = scrape(host)
        assert value(before, "netagent_networks") == 1  # the default network
        assert value(before, "netagent_endpoints") == 0
        assert ("netagent_pending_deletions", frozenset()) in before
        assert value(before, "process_start_time_seconds") > 0
        host.ctl("network", "create", "--subnet", "10.70.0.0/24", "m1")
        assert host.ctl("network", "create", "m1", check=False).returncode != 0
        c = unique("m-")
        host.ctl("run", "--network", "m1", "-p", "8080:80", c)
        after = scrape(host)
        create = {"method": "network.create"}
        assert value(after, REQUESTS, **create, outcome="ok") == 1
        assert value(after, REQUESTS, **create, outcome="conflict") == 1
        assert value(after, REQUESTS, method="sandbox.run", outcome="ok") == 1
        assert value(after, "netagent_networks") == 2
        assert value(after, "netagent_endpoints") == 1
        assert value(after, KERNEL, call="attach", outcome="ok") == 1
        assert value(after, KERNEL, call="ensure_bridge", outcome="ok") >= 2
        applies = value(after, FIREWALL, call="apply", outcome="ok")
        assert applies >= 2 and value(after, FIREWALL, call="setup", outcome="ok") == 1
        assert value(after, "netagent_request_duration_seconds_sum", **create, outcome="ok") > 0
        # repairs by kind: a bridge deleted by hand, a namespace deleted under its endpoint
        net = host.call("network.inspect", network="m1")["network"]
        sh("ip", "-n", host.name, "link", "del", net["bridge"])
        # (the bridge's removal is reported twice: its gateway address went with it)
        wait_for(lambda: value(scrape(host), "netagent_repairs_total", kind="network") >= 1)
        sh("ip", "netns", "del", c)
        wait_for(
            lambda: value(scrape(host), "netagent_repairs_total", kind="endpoint_vanished") == 1
        )
        last = scrape(host)
        assert value(last, "netagent_endpoints") == 0
        assert value(last, FIREWALL, call="apply", outcome="ok") > applies
        # agentctl info: the headline figures
        info = json.loads(host.ctl("info", "--json").stdout)
        assert info["metrics"] == f"127.0.0.1:{PORT}"
        assert info["repairs"] == sum(
            v for (name, _), v in last.items() if name == "netagent_repairs_total"
        )
        assert info["repairs"] >= 2
        assert info["request_errors"] >= 1
        assert info["requests"] >= 5
        text = host.ctl("info").stdout
        assert "Repairs:" in text and "Requests:" in text


@pytest.mark.kernel
def test_connections_gauge() -> None:
    with running_host("--metrics", f"127.0.0.1:{PORT}") as host:
        wait_for(lambda: value(scrape(host), "netagent_api_connections") == 0)
        held = [Client(host.socket, timeout=10) for _ in range(3)]
        for client in held:
            client.call("system.info")  # connected, and kept open
        assert value(scrape(host), "netagent_api_connections") == 3
        assert Client(host.socket, timeout=10).call("system.info")["connections"] == 4
        for client in held:
            client.close()
        wait_for(lambda: value(scrape(host), "netagent_api_connections") == 0)
        assert value(scrape(host), "netagent_api_connections_accepted_total") >= 4


@pytest.mark.kernel
def test_metrics_on_a_unix_socket_and_http_edges(tmp_path: Path) -> None:
    path = str(tmp_path / "metrics.sock")
    with running_host("--metrics", path) as host:
        url = "http://agentd/metrics"
        r = sh("curl", "-sf", "--unix-socket", path, "-D", "-", url)
        head, _, body = r.stdout.partition("\n\n")  # (text mode: \r\n read as \n)
        assert head.startswith("HTTP/1.1 200 OK")
        assert "text/plain; version=" in head.lower()
        assert value(_samples(body), "netagent_networks") == 1
        status = sh("curl", "-s", "--unix-socket", path, "-o", "/dev/null", "-w", "%{http_code}",
                    "http://agentd/other").stdout  # fmt: skip
        assert status == "404"
        status = sh("curl", "-s", "--unix-socket", path, "-o", "/dev/null", "-w", "%{http_code}",
                    "-X", "POST", "-d", "x", url).stdout  # fmt: skip
        assert status == "405"
        # keep-alive: two requests on one connection
        r = sh("curl", "-sf", "-v", "--unix-socket", path, url, url)
        assert r.stderr.count("Re-using existing connection") == 1
        # garbage does not hurt it
        sh("sh", "-c", f"printf 'NOT HTTP\\r\\n\\r\\n' | curl -s --unix-socket {path} "
           "telnet://x -m 2 >/dev/null || true")  # fmt: skip
        assert sh("curl", "-sf", "--unix-socket", path, url).returncode == 0
        # idle scrapers beyond the limit are closed at once; the others do not block a scrape
        # once they go
        idle = []
        for _ in range(MAX_SCRAPERS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
        time.sleep(0.2)
        refused = sh("curl", "-s", "-m", "5", "--unix-socket", path, url, check=False)
        assert refused.returncode in (7, 52, 56) and refused.stdout == ""  # not served
        for s in idle:
            s.close()
        wait_for(lambda: sh("curl", "-sf", "--unix-socket", path, url, check=False).returncode == 0)
        assert host.stop() == 0
        assert not os.path.exists(path)  # its socket file goes with it


@pytest.mark.parametrize("bad", ["9464", "localhost", "host:0", "host:70000", ":9464", "h:x"])
def test_bad_metrics_address_refused(bad: str) -> None:
    with pytest.raises(AddressError):
        parse_address(bad)
    r = subprocess.run(
        [str(VENV_BIN / "agentd"), "--metrics", bad, "--state-dir", "/nonexistent/x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "--metrics" in r.stderr and "HOST:PORT" in r.stderr


@pytest.mark.parametrize(
    ("addr", "parsed"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80)),
     ("/run/netagent/metrics.sock", "/run/netagent/metrics.sock"), ("x.y:1", ("x.y", 1))],
)  # fmt: skip
def test_metrics_address(addr: str, parsed: object) -> None:
    assert parse_address(addr) == parsed


def test_every_method_is_audited_unless_read_only() -> None:
    assert set(p.METHODS) >= READ_ONLY
    assert "network.create" not in READ_ONLY and "system.reconcile" not in READ_ONLY


def _audit_lines(host: Host) -> list[dict]:
    lines = []
    for line in host.log().splitlines():
        if '"audit"' in line:
            lines.append(json.loads(line))
    return lines


@pytest.mark.kernel
def test_audit_line_per_mutation_with_peer_credentials() -> None:
    with running_host() as host:
        client = Client(host.socket, timeout=30)
        client.call("network.create", {"name": "audited", "subnet": "10.71.0.0/24"})
        with pytest.raises(Exception, match="already"):
            client.call("network.create", {"name": "audited"})
        client.call("network.list", {})
        client.call("system.info")
        client.call("network.remove", {"network": "audited"})
        lines = _audit_lines(host)
        assert [(x["method"], x["outcome"]) for x in lines] == [
            ("network.create", "ok"), ("network.create", "conflict"), ("network.remove", "ok"),
        ]  # fmt: skip
        for line in lines:
            assert line["peer_uid"] == os.getuid() and line["peer_pid"] == os.getpid()
        assert lines[0]["params"]["name"] == "audited"
        assert lines[0]["params"]["subnet"] == "10.71.0.0/24"


# -- fuzz: parse or refuse, never anything else -----------------------------------------------


@given(st.text(max_size=40))
def test_parse_address_fuzz(addr: str) -> None:
    try:
        parsed = parse_address(addr)
    except AddressError:
        return
    assert parsed == addr if isinstance(parsed, str) else 0 < parsed[1] < 65536


_REQUEST_PARTS = st.sampled_from(
    [b"GET /metrics HTTP/1.1\r\n", b"HEAD / HTTP/1.1\r\n", b"POST /metrics HTTP/1.1\r\n",
     b"Host: x\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
     b"Connection: close\r\n", b"\r\n", b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"\x00\xff",
     b"GET /metrics HTTP/1.0\r\n\r\n"]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_REQUEST_PARTS, st.binary(max_size=30)), max_size=12))
def test_http_responder_fuzz(chunks: list[bytes]) -> None:
    """Whatever a client sends, the responder answers (400 for what is not HTTP) or closes,
    never raises, and returns once the client has closed."""
    import trio
    import trio.testing

    from agent.metrics import Metrics, _serve_http

    metrics = Metrics()

    async def main() -> None:
        server, client = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:

            async def talk() -> None:
                with contextlib.suppress(trio.BrokenResourceError):  # answered and closed
                    for chunk in chunks:
                        await client.send_all(chunk)
                    await client.send_eof()
                while await client.receive_some(65536):
                    pass

            nursery.start_soon(talk)
            with trio.fail_after(5):
                await _serve_http(server, metrics)  # a bad request is answered, not raised
            await server.aclose()

    trio.run(main)
