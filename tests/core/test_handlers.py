"""The JSON-RPC front end: its handler table is the protocol, and it only converts.

Requests go through `server.dispatch` (decode, handler, encode) into a service built on fakes,
so what is checked is what a client gets.
"""

from __future__ import annotations

import json

import pytest

from agent.frontends.jsonrpc import handlers
from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.server import dispatch
from agent.service import Service
from agent.service.reconcile import Reconciler


def _info() -> p.Info:
    return p.Info(version="t", pid=1, socket="s", state_dir="d", networks=0, endpoints=0,
                  accelerated=False, firewall="fake", uptime_s=0.0)  # fmt: skip


@pytest.fixture
def table(svc: Service) -> dict:
    return handlers.build(svc, Reconciler(svc), _info)


async def call(table, method: str, **params) -> dict:
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    answer = await dispatch(table, line.encode())
    assert isinstance(answer, bytes)
    return json.loads(answer)


async def test_the_handler_table_is_the_protocol(table) -> None:
    assert set(table) == set(p.METHODS)


async def test_network_options_by_any_name_reach_the_network(table) -> None:
    options = {"com.docker.network.bridge.enable_icc": "false", "mtu": "1400",
               "com.docker.network.bridge.name": "brx"}  # fmt: skip
    net = (await call(table, "network.create", name="a", options=options))["result"]
    assert (net["icc"], net["mtu"], net["bridge"], net["masquerade"]) == (False, 1400, "brx", True)
    bad = await call(table, "network.create", name="b", options={"colour": "blue"})
    assert bad["error"]["data"]["kind"] == "invalid_argument"
    assert "colour" in bad["error"]["message"]
    clash = await call(table, "network.create", name="c", internal=True,
                       options={"internal": "false"})  # fmt: skip
    assert clash["error"]["data"] == {"kind": "invalid_argument", "field": "internal"}


async def test_connect_converts_ports_ifname_and_attachment(table) -> None:
    await call(table, "network.create", name="a", subnet="10.1.0.0/24")
    answer = await call(table, "endpoint.connect", network="a", netns="ok1", ifname="net1",
                        attachment="c1/net1", ports=["8080:80", "127.0.0.1:53:53/udp"])  # fmt: skip
    ep = answer["result"]
    assert (ep["ifname"], ep["attachment"], len(ep["ports"])) == ("net1", "c1/net1", 2)
    bad = await call(table, "endpoint.connect", network="a", netns="ok2", ports=["80:x"])
    assert bad["error"]["data"]["kind"] == "invalid_argument"
    gone = await call(table, "endpoint.remove", endpoint="c1/net1")
    assert gone["result"]["id"] == ep["id"]
    again = await call(table, "endpoint.remove", endpoint="c1/net1", force=True)
    assert again["result"] is None
