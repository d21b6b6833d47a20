"""Docker's plugin protocol against the handler (`DockerPlugin.handle`) over the service with
fake shells: every endpoint, bad JSON, unknown ids, idempotent removals, errors that change
nothing, and netagent's IPAM."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import naming
from agent.frontends.docker.handlers import DockerPlugin
from agent.service import Service
from tests.core.fakes import FakeKernel

NET = "a1" * 32
NET2 = "b2" * 32
EP = "e1" * 32
EP2 = "e2" * 32
SANDBOX = "/var/run/docker/netns/0123456789ab"


@pytest.fixture
def plugin(svc: Service) -> DockerPlugin:
    return DockerPlugin(svc)


async def post(plugin: DockerPlugin, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await plugin.handle(path, raw)


async def ok(plugin: DockerPlugin, path: str, body: Any = None) -> dict[str, Any]:
    status, answer = await post(plugin, path, body)
    assert status == 200 and "Err" not in answer, answer
    return answer


async def err(plugin: DockerPlugin, path: str, body: Any = None, status: int = 200) -> str:
    got, answer = await post(plugin, path, body)
    assert got == status and set(answer) == {"Err"} and answer["Err"], answer
    return str(answer["Err"])


def create_network(
    net_id: str = NET, pool: str = "172.30.0.0/16", gateway: str = "172.30.0.1/16", **opts: Any
) -> dict[str, Any]:
    return {
        "NetworkID": net_id,
        "Options": {"com.docker.network.generic": opts.pop("generic", {}), **opts},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": pool, "Gateway": gateway}],
        "IPv6Data": [],
    }


def create_endpoint(ep: str = EP, address: str = "172.30.0.2/16", mac: str = "") -> dict:
    return {
        "NetworkID": NET,
        "EndpointID": ep,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": mac},
        "Options": {"com.docker.network.endpoint.exposedports": []},
    }


def snapshot(svc: Service, kernel: FakeKernel) -> tuple:
    topo = svc.topo
    return (
        sorted(topo.networks),
        sorted((e.id, e.netns_key, e.ports) for e in topo.endpoints.values()),
        sorted(kernel.bridges),
        sorted(kernel.veths),
        {k: a.used for k, a in topo.allocators.items()},
    )


async def joined(plugin: DockerPlugin) -> dict[str, Any]:
    await ok(plugin, "/NetworkDriver.CreateNetwork", create_network())
    await ok(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint())
    return await ok(
        plugin,
        "/NetworkDriver.Join",
        {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": {}},
    )


# -- fixed answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/Plugin.Activate", {"Implements": ["NetworkDriver", "IpamDriver"]}),
        ("/NetworkDriver.GetCapabilities", {"Scope": "local", "ConnectivityScope": "local"}),
        ("/IpamDriver.GetCapabilities", {"RequiresMACAddress": False}),
        (
            "/IpamDriver.GetDefaultAddressSpaces",
            {"LocalDefaultAddressSpace": "netagent", "GlobalDefaultAddressSpace": "netagent"},
        ),
        ("/NetworkDriver.DiscoverNew", {}),
        ("/NetworkDriver.DiscoverDelete", {}),
    ],
)
@pytest.mark.parametrize("body", [b"", b"null", b"{}"])
async def test_fixed_answers(plugin: DockerPlugin, path: str, answer: dict, body: bytes) -> None:
    assert await post(plugin, path, body) == (200, answer)


# -- the network driver -------------------------------------------------------------------------


async def test_create_network_uses_dockers_pool_and_options(plugin: DockerPlugin, svc) -> None:
    generic = {
        "com.docker.network.bridge.enable_icc": "false",
        "com.docker.network.driver.mtu": "1400",
    }
    await ok(plugin, "/NetworkDriver.CreateNetwork", create_network(generic=generic))
    net = svc.topo.networks[NET]
    assert (net.name, net.subnet, net.gateway) == (NET[:12], "172.30.0.0/16", "172.30.0.1")
    assert (net.icc, net.mtu, net.internal, net.bridge) == (False, 1400, False, f"br-{NET[:12]}")
    assert svc.shared.kernel.bridges[net.bridge] == "172.30.0.1/16"  # type: ignore[attr-defined]


async def test_internal_and_ipv6_arrive_as_their_own_options(plugin: DockerPlugin, svc) -> None:
    body = create_network(**{"com.docker.network.internal": True})
    body["Options"]["com.docker.network.enable_ipv6"] = True
    body["IPv6Data"] = [{"Pool": "fd00:1::/64", "Gateway": "fd00:1::1/64"}]
    await ok(plugin, "/NetworkDriver.CreateNetwork", body)
    net = svc.topo.networks[NET]
    assert (net.internal, net.ipv6, net.subnet6, net.gateway6) == (
        True,
        True,
        "fd00:1::/64",
        "fd00:1::1",
    )


async def test_endpoint_lifecycle(plugin: DockerPlugin, svc: Service) -> None:
    kernel: FakeKernel = svc.shared.kernel  # type: ignore[assignment]
    await ok(plugin, "/NetworkDriver.CreateNetwork", create_network())
    answer = await ok(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint())
    ep = svc.topo.endpoint_of_attachment(EP)
    assert ep is not None and not ep.joined and ep.ip == "172.30.0.2"
    assert answer == {"Interface": {"MacAddress": ep.mac}}  # only what Docker left empty
    assert not kernel.veths  # reserved: nothing in the kernel yet

    answer = await ok(
        plugin,
        "/NetworkDriver.Join",
        {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": None},
    )
    peer = naming.host_peer_name(ep.id)
    assert answer == {
        "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
        "Gateway": "172.30.0.1",
    }
    ep = svc.topo.endpoint_of_attachment(EP)
    assert ep is not None and ep.joined and ep.netns == SANDBOX
    assert ep.netns_key == naming.engine_netns_key(SANDBOX)
    assert kernel.veths[ep.host_ifname].ifname == peer
    assert kernel.in_host == {ep.host_ifname}  # made in the host namespace, for Docker
    info = await ok(plugin, "/NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP})
    assert info == {"Value": {}}

    await ok(plugin, "/NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
    assert svc.topo.endpoint_of_attachment(EP) is None
    await svc.reaper.wait_idle()
    assert not kernel.veths and svc.topo.allocators[NET].used == 0
    # Docker's DeleteEndpoint after Leave, and its retries, succeed
    for _ in range(2):
        await ok(plugin, "/NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    for _ in range(2):
        await ok(plugin, "/NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert not svc.topo.networks or all(n.is_default for n in svc.topo.networks.values())


async def test_an_address_still_dying_is_waited_for(plugin: DockerPlugin, svc) -> None:
    """Docker's IPAM gives a removed container's address to the next one at once, while its
    veth (and so the address) is still in the reaper's batch: CreateEndpoint waits for it."""
    kernel: FakeKernel = svc.shared.kernel  # type: ignore[assignment]
    await joined(plugin)
    kernel.reap_gate = trio.Event()  # hold the batch back
    await ok(plugin, "/NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
    assert svc.reaper.backlog
    results: list[tuple[int, dict]] = []

    async def create() -> None:
        results.append(await post(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint(EP2)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        await trio.testing.wait_all_tasks_blocked()
        waited = results == []  # waiting for the batch, not refused
        kernel.reap_gate.set()
    assert waited, results
    assert results[0][0] == 200 and "Err" not in results[0][1], results
    ep = svc.topo.endpoint_of_attachment(EP2)
    assert ep is not None and ep.ip == "172.30.0.2"


async def test_a_given_mac_is_kept_and_not_answered(plugin: DockerPlugin, svc) -> None:
    await ok(plugin, "/NetworkDriver.CreateNetwork", create_network())
    body = create_endpoint(mac="02:00:00:00:00:aa")
    assert await ok(plugin, "/NetworkDriver.CreateEndpoint", body) == {}
    ep = svc.topo.endpoint_of_attachment(EP)
    assert ep is not None and ep.mac == "02:00:00:00:00:aa"


async def test_delete_endpoint_of_a_reserved_endpoint(plugin: DockerPlugin, svc) -> None:
    await ok(plugin, "/NetworkDriver.CreateNetwork", create_network())
    await ok(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint())
    await ok(plugin, "/NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    assert svc.topo.endpoint_of_attachment(EP) is None
    assert svc.topo.allocators[NET].used == 0


async def test_internal_network_joins_without_gateway(plugin: DockerPlugin) -> None:
    await ok(
        plugin,
        "/NetworkDriver.CreateNetwork",
        create_network(**{"com.docker.network.internal": True}),
    )
    await ok(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint())
    answer = await ok(
        plugin, "/NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX}
    )
    assert "Gateway" not in answer


PORTMAP = [
    {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
    {"Proto": 6, "IP": "", "Port": 80, "HostIP": "::", "HostPort": 8080, "HostPortEnd": 8080},
    {"Proto": 17, "IP": "", "Port": 53, "HostIP": "0.0.0.0", "HostPort": 5353},
]


async def test_published_ports_program_and_revoke(plugin: DockerPlugin, svc: Service) -> None:
    await joined(plugin)
    body = {"NetworkID": NET, "EndpointID": EP, "Options": {"com.docker.network.portmap": PORTMAP}}
    for _ in range(2):  # a retry publishes nothing twice
        await ok(plugin, "/NetworkDriver.ProgramExternalConnectivity", body)
        ep = svc.topo.endpoint_of_attachment(EP)
        assert ep is not None
        assert [(m.protocol, m.host_port, m.container_port, m.host_ip) for m in ep.ports] == [
            ("tcp", 8080, 80, ""),
            ("udp", 5353, 53, ""),
        ]
    forwards = svc.shared.firewall.policy.v4.forwards[NET]  # type: ignore[attr-defined]
    assert {(f.host_port, f.address) for f in forwards} == {(8080, ep.ip), (5353, ep.ip)}
    revoke = {"NetworkID": NET, "EndpointID": EP}
    for _ in range(2):
        await ok(plugin, "/NetworkDriver.RevokeExternalConnectivity", revoke)
        ep = svc.topo.endpoint_of_attachment(EP)
        assert ep is not None and ep.ports == ()
        assert svc.shared.firewall.forwards == 0  # type: ignore[attr-defined]
    await ok(
        plugin, "/NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP2}
    )


# -- errors change nothing ----------------------------------------------------------------------


async def test_bad_bodies_are_refused(plugin: DockerPlugin) -> None:
    assert "invalid JSON" in await err(plugin, "/NetworkDriver.CreateNetwork", b"{nope", 400)
    assert "NetworkID" in await err(plugin, "/NetworkDriver.CreateNetwork", {}, 400)
    assert "invalid request" in await err(
        plugin, "/NetworkDriver.Join", {"NetworkID": 1, "EndpointID": EP, "SandboxKey": "/x"}, 400
    )
    assert "unknown plugin endpoint" in await err(plugin, "/NetworkDriver.Nope", {}, 404)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (
            "/NetworkDriver.CreateNetwork",
            create_network(generic={"com.docker.network.bridge.enable_icc": "maybe"}),
            "expected true or false",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            create_network(generic={"nope": "1"}),
            "unknown network option",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            create_network(NET2, pool="172.30.0.0/33"),
            "172.30.0.0/33",
        ),
        ("/NetworkDriver.CreateNetwork", create_network(NET2, gateway="10.0.0.1/8"), "10.0.0.1"),
        ("/NetworkDriver.CreateNetwork", create_network(net_id="xyz"), "invalid network id"),
        (
            "/NetworkDriver.CreateNetwork",
            create_network(**{"com.docker.network.enable_ipv6": True}),
            "IPv6 pool",
        ),
        (
            "/NetworkDriver.CreateNetwork",
            create_network(NET2, pool="172.31.0.0/16", gateway=""),
            "overlaps",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            create_endpoint(ep=EP2, address="172.99.0.9/16"),
            "172.99.0.9",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            create_endpoint(ep=EP2, address="not-an-ip"),
            "not-an-ip",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            create_endpoint(ep=EP2, address="172.31.0.2/16"),
            "in use",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            create_endpoint(ep=EP, address="172.31.0.7/16"),
            "already has an endpoint",
        ),
        (
            "/NetworkDriver.CreateEndpoint",
            {**create_endpoint(ep=EP2), "NetworkID": NET2},
            "network",
        ),
        (
            "/NetworkDriver.Join",
            {"NetworkID": NET, "EndpointID": EP2, "SandboxKey": SANDBOX},
            "not found",
        ),
        (
            "/NetworkDriver.Join",
            {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "relative"},
            "not a path",
        ),
        (
            "/NetworkDriver.ProgramExternalConnectivity",
            {
                "NetworkID": NET,
                "EndpointID": EP,
                "Options": {
                    "com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 0}]
                },
            },
            "no host port",
        ),
        (
            "/NetworkDriver.ProgramExternalConnectivity",
            {
                "NetworkID": NET,
                "EndpointID": EP,
                "Options": {
                    "com.docker.network.portmap": [{"Proto": 132, "Port": 80, "HostPort": 80}]
                },
            },
            "protocol 132",
        ),
        (
            "/NetworkDriver.ProgramExternalConnectivity",
            {
                "NetworkID": NET,
                "EndpointID": EP,
                "Options": {"com.docker.network.portmap": [{"Port": 80}]},
            },
            "portmap",
        ),
        (
            "/NetworkDriver.ProgramExternalConnectivity",
            {
                "NetworkID": NET,
                "EndpointID": EP2,
                "Options": {"com.docker.network.portmap": PORTMAP},
            },
            "does not exist",
        ),
    ],
)
async def test_refusals_change_nothing(
    plugin: DockerPlugin, svc: Service, path: str, body: dict, words: str
) -> None:
    """Starting from one network (172.31.0.0/16) with one reserved endpoint (172.31.0.2)."""
    kernel: FakeKernel = svc.shared.kernel  # type: ignore[assignment]
    await ok(
        plugin,
        "/NetworkDriver.CreateNetwork",
        create_network(pool="172.31.0.0/16", gateway="172.31.0.1/16"),
    )
    await ok(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint(address="172.31.0.2/16"))
    before = snapshot(svc, kernel)
    stored = svc.shared.store.load()
    message = await err(plugin, path, body)
    assert words in message
    assert snapshot(svc, kernel) == before
    assert svc.shared.store.load() == stored


async def test_a_failed_join_leaves_the_endpoint_reserved(plugin: DockerPlugin, svc) -> None:
    await ok(plugin, "/NetworkDriver.CreateNetwork", create_network())
    await ok(plugin, "/NetworkDriver.CreateEndpoint", create_endpoint())
    svc.shared.kernel.fail_attach = True
    join = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX}
    assert "on purpose" in await err(plugin, "/NetworkDriver.Join", join)
    ep = svc.topo.endpoint_of_attachment(EP)
    assert ep is not None and not ep.joined
    svc.shared.kernel.fail_attach = False
    await ok(plugin, "/NetworkDriver.Join", join)


async def test_delete_network_with_endpoints_is_refused(plugin: DockerPlugin, svc) -> None:
    await joined(plugin)
    assert "active endpoint" in await err(
        plugin, "/NetworkDriver.DeleteNetwork", {"NetworkID": NET}
    )
    assert NET in svc.topo.networks


async def test_unexpected_errors_become_an_incident(plugin: DockerPlugin, svc) -> None:
    async def boom(_: object) -> dict:
        raise RuntimeError("bug")

    plugin.routes["/NetworkDriver.DiscoverNew"] = (
        plugin.routes["/NetworkDriver.DiscoverNew"][0],
        boom,
    )
    message = await err(plugin, "/NetworkDriver.DiscoverNew", {}, 500)
    assert "incident" in message and "bug" not in message


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        [
            "/NetworkDriver.CreateNetwork",
            "/NetworkDriver.CreateEndpoint",
            "/NetworkDriver.Join",
            "/NetworkDriver.ProgramExternalConnectivity",
            "/IpamDriver.RequestPool",
            "/IpamDriver.RequestAddress",
            "/NetworkDriver.Leave",
        ]
    ),
    body=st.one_of(
        st.binary(max_size=64),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "NetworkID",
                            "EndpointID",
                            "SandboxKey",
                            "Options",
                            "Pool",
                            "PoolID",
                            "Address",
                            "IPv4Data",
                            "Interface",
                            "V6",
                        ]
                    ),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=8,
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
async def test_any_body_gets_an_answer_never_an_exception(plugin: DockerPlugin, path, body) -> None:
    status, answer = await plugin.handle(path, body)
    assert status in (200, 400) and isinstance(answer, dict)
    if status == 400:
        assert set(answer) == {"Err"}


# -- netagent's IPAM ----------------------------------------------------------------------------


async def test_ipam_pools_addresses_and_release(plugin: DockerPlugin, svc: Service) -> None:
    first = await ok(
        plugin,
        "/IpamDriver.RequestPool",
        {"AddressSpace": "netagent", "Pool": "", "SubPool": "", "Options": None, "V6": False},
    )
    second = await ok(plugin, "/IpamDriver.RequestPool", {"AddressSpace": "netagent"})
    assert first["Pool"] == first["PoolID"] == "172.17.0.0/16"
    assert second["Pool"] == "172.18.0.0/16"  # the first is pending: not proposed twice
    await ok(plugin, "/IpamDriver.ReleasePool", {"PoolID": second["PoolID"]})
    pool = first["PoolID"]
    gateway = await ok(
        plugin,
        "/IpamDriver.RequestAddress",
        {
            "PoolID": pool,
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    assert gateway == {"Address": "172.17.0.1/16", "Data": {}}
    assert "no network uses pool" in await err(
        plugin, "/IpamDriver.RequestAddress", {"PoolID": pool, "Options": None}
    )
    await ok(
        plugin,
        "/NetworkDriver.CreateNetwork",
        create_network(pool=pool, gateway=gateway["Address"]),
    )
    a = await ok(
        plugin, "/IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": None}
    )
    b = await ok(plugin, "/IpamDriver.RequestAddress", {"PoolID": pool})
    assert (a["Address"], b["Address"]) == ("172.17.0.2/16", "172.17.0.3/16")
    assert svc.topo.allocators[NET].used == 0  # proposed, not taken: CreateEndpoint takes them
    await ok(
        plugin,
        "/NetworkDriver.CreateEndpoint",
        {**create_endpoint(address=a["Address"]), "NetworkID": NET},
    )
    assert svc.topo.allocators[NET].used == 1
    c = await ok(plugin, "/IpamDriver.RequestAddress", {"PoolID": pool, "Address": "172.17.0.9"})
    assert c["Address"] == "172.17.0.9/16"
    await ok(plugin, "/IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": a["Address"]})
    await ok(plugin, "/IpamDriver.ReleasePool", {"PoolID": pool})
    await ok(plugin, "/IpamDriver.ReleasePool", {"PoolID": "garbage"})
    # a new pool avoids the network's subnet
    third = await ok(plugin, "/IpamDriver.RequestPool", {})
    assert third["Pool"] not in (pool,)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"V6": True}, "IPv6"),
        ({"Pool": "172.20.0.0/16", "SubPool": "172.20.1.0/24"}, "ip-range"),
        ({"Pool": "172.20.0.1/16"}, "172.20.0.1/16"),
        ({"Pool": "nonsense"}, "nonsense"),
    ],
)
async def test_ipam_refusals(plugin: DockerPlugin, body: dict, words: str) -> None:
    assert words in await err(plugin, "/IpamDriver.RequestPool", body)
    assert not plugin.pending


async def test_ipam_explicit_pool_and_overlap(plugin: DockerPlugin) -> None:
    got = await ok(plugin, "/IpamDriver.RequestPool", {"Pool": "10.5.0.0/24"})
    assert got["PoolID"] == "10.5.0.0/24"
    assert "overlaps" in await err(plugin, "/IpamDriver.RequestPool", {"Pool": "10.5.0.0/16"})
    assert "not in pool" in await err(
        plugin,
        "/IpamDriver.RequestAddress",
        {
            "PoolID": "10.5.0.0/24",
            "Address": "10.6.0.1",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
