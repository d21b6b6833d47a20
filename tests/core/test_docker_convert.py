"""Docker's plugin requests as core values (pure): case tables."""

from __future__ import annotations

import pytest

from agent.core.errors import InvalidArgument
from agent.core.model import PortMapping
from agent.frontends.docker import convert, wire

NET = "c3" * 32


def test_network_spec_from_dockers_pool_and_generic_options() -> None:
    req = wire.CreateNetwork(
        NetworkID=NET,
        Options={
            "com.docker.network.generic": {
                "com.docker.network.bridge.name": "docker-br",
                "com.docker.network.bridge.enable_ip_masquerade": "false",
                "mtu": "1450",
            },
            "com.docker.network.enable_ipv6": False,
        },
        IPv4Data=[
            wire.IPAMData(
                Pool="10.9.0.0/24", Gateway="10.9.0.254/24", AuxAddresses={"r": "10.9.0.5/24"}
            )
        ],
    )
    spec = convert.network_spec(req)
    assert (spec.id, spec.name, spec.subnet, spec.gateway) == (
        NET,
        NET[:12],
        "10.9.0.0/24",
        "10.9.0.254",
    )
    assert (spec.bridge, spec.masquerade, spec.mtu, spec.ipv6) == ("docker-br", False, 1450, False)
    assert spec.aux_addresses == {"r": "10.9.0.5"}


def test_network_spec_without_pool_or_options() -> None:
    spec = convert.network_spec(wire.CreateNetwork(NetworkID=NET, Options=None, IPv4Data=None))
    assert spec.subnet is None and spec.gateway is None and not spec.internal


@pytest.mark.parametrize(
    ("req", "words"),
    [
        (
            wire.CreateNetwork(NetworkID=NET, Options={"com.docker.network.generic": "x"}),
            "must be an object",
        ),
        (
            wire.CreateNetwork(NetworkID=NET, IPv4Data=[wire.IPAMData(Pool="10.0.0.0/24")] * 2),
            "one IPv4 pool",
        ),
        (
            wire.CreateNetwork(
                NetworkID=NET, IPv4Data=[wire.IPAMData(Pool="10.0.0.0/24", Gateway="gw")]
            ),
            "invalid gateway",
        ),
        (
            wire.CreateNetwork(
                NetworkID=NET,
                Options={
                    "com.docker.network.internal": True,
                    "com.docker.network.generic": {"internal": "false"},
                },
            ),
            "contradicts",
        ),
    ],
)
def test_network_spec_refusals(req: wire.CreateNetwork, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        convert.network_spec(req)


@pytest.mark.parametrize(
    ("flag", "internal"),
    [(True, True), ("true", True), (False, False), ("false", False), (None, False)],
)
def test_internal_flag_forms(flag: object, internal: bool) -> None:
    options = {} if flag is None else {"com.docker.network.internal": flag}
    spec = convert.network_spec(wire.CreateNetwork(NetworkID=NET, Options=options))
    assert spec.internal is internal


def test_endpoint_spec_strips_prefixes() -> None:
    req = wire.CreateEndpoint(
        NetworkID=NET,
        EndpointID="e" * 64,
        Interface=wire.EndpointInterface(
            Address="10.9.0.7/24", AddressIPv6="fd00::7/64", MacAddress=""
        ),
    )
    spec = convert.endpoint_spec(req)
    assert (spec.network, spec.ip, spec.ip6, spec.mac, spec.attachment, spec.netns) == (
        NET,
        "10.9.0.7",
        "fd00::7",
        None,
        "e" * 64,
        None,
    )
    assert convert.created_interface(req, "02:42:0a:09:00:07") == {
        "Interface": {"MacAddress": "02:42:0a:09:00:07"}
    }
    empty = wire.CreateEndpoint(NetworkID=NET, EndpointID="e" * 64, Interface=None)
    assert convert.endpoint_spec(empty).ip is None


@pytest.mark.parametrize(
    ("portmap", "expected"),
    [
        (None, []),
        ([], []),
        (
            [{"Proto": 6, "Port": 80, "HostPort": 8080, "HostIP": ""}],
            [PortMapping(protocol="tcp", host_port=8080, container_port=80)],
        ),
        (
            [
                {"Proto": 17, "Port": 53, "HostPort": 53, "HostIP": "0.0.0.0"},
                {"Proto": 17, "Port": 53, "HostPort": 53, "HostIP": "::"},
            ],
            [PortMapping(protocol="udp", host_port=53, container_port=53)],
        ),
        (
            [{"Proto": 6, "Port": 80, "HostPort": 81, "HostIP": "127.0.0.1"}],
            [PortMapping(protocol="tcp", host_port=81, container_port=80, host_ip="127.0.0.1")],
        ),
    ],
)
def test_port_mappings(portmap: object, expected: list[PortMapping]) -> None:
    options = {} if portmap is None else {"com.docker.network.portmap": portmap}
    assert convert.port_mappings(options) == expected


@pytest.mark.parametrize(
    ("portmap", "words"),
    [
        ([{"Proto": 6, "Port": 80}], "no host port"),
        ([{"Proto": 1, "Port": 80, "HostPort": 80}], "protocol 1"),
        ([{"Proto": "tcp", "Port": 80, "HostPort": 80}], "portmap"),
        ("nope", "portmap"),
    ],
)
def test_port_mapping_refusals(portmap: object, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        convert.port_mappings({"com.docker.network.portmap": portmap})


@pytest.mark.parametrize(
    ("pool", "address", "gateway", "answer"),
    [
        ("10.1.0.0/16", "", True, "10.1.0.1/16"),
        ("10.1.0.0/16", "10.1.0.9", True, "10.1.0.9/16"),
        ("10.1.0.0/16", "10.1.0.9/16", False, "10.1.0.9/16"),
        ("10.1.0.4/32", "", True, "10.1.0.4/32"),
    ],
)
def test_pool_address(pool: str, address: str, gateway: bool, answer: str) -> None:
    assert convert.pool_address(pool, address, gateway=gateway) == answer


@pytest.mark.parametrize(
    ("pool", "address", "gateway", "words"),
    [
        ("10.1.0.0/16", "10.2.0.1", True, "not in pool"),
        ("nonsense", "", True, "invalid pool"),
        ("10.1.0.0/16", "", False, "no address"),
        ("10.1.0.0/16", "x", False, "invalid address"),
    ],
)
def test_pool_address_refusals(pool: str, address: str, gateway: bool, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        convert.pool_address(pool, address, gateway=gateway)
