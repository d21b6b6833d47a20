"""The request bodies of Docker's plugin protocol, as dockerd 20.10 sends them (pure).

libnetwork's `drivers/remote/api` and `ipams/remote/api` define them; field names are
Docker's (capitalised JSON keys). Unknown fields are ignored (a newer dockerd may add some);
a missing required field, a field of the wrong type or invalid JSON is a `msgspec` error,
which the handlers answer with `{"Err": ...}`. `Options` may be null.
"""

from __future__ import annotations

from typing import Any

import msgspec


class IPAMData(msgspec.Struct, frozen=True):
    """One address pool of a network: `Pool` and `Gateway` in CIDR form."""

    AddressSpace: str = ""
    Pool: str = ""
    Gateway: str = ""
    AuxAddresses: dict[str, str] | None = None


class CreateNetwork(msgspec.Struct, frozen=True):
    NetworkID: str
    Options: dict[str, Any] | None = None
    IPv4Data: list[IPAMData] | None = None
    IPv6Data: list[IPAMData] | None = None


class NetworkRef(msgspec.Struct, frozen=True):
    NetworkID: str


class EndpointInterface(msgspec.Struct, frozen=True):
    Address: str = ""
    AddressIPv6: str = ""
    MacAddress: str = ""


class CreateEndpoint(msgspec.Struct, frozen=True):
    NetworkID: str
    EndpointID: str
    Interface: EndpointInterface | None = None
    Options: dict[str, Any] | None = None


class EndpointRef(msgspec.Struct, frozen=True):
    """DeleteEndpoint, EndpointOperInfo, Leave, RevokeExternalConnectivity."""

    NetworkID: str
    EndpointID: str


class Join(msgspec.Struct, frozen=True):
    NetworkID: str
    EndpointID: str
    SandboxKey: str
    Options: dict[str, Any] | None = None


class Connectivity(msgspec.Struct, frozen=True):
    """ProgramExternalConnectivity."""

    NetworkID: str
    EndpointID: str
    Options: dict[str, Any] | None = None


class PortBinding(msgspec.Struct, frozen=True):
    """One entry of `com.docker.network.portmap` (libnetwork's `types.PortBinding`)."""

    Proto: int
    Port: int
    HostPort: int = 0
    HostPortEnd: int = 0
    IP: str = ""
    HostIP: str = ""


class RequestPool(msgspec.Struct, frozen=True):
    AddressSpace: str = ""
    Pool: str = ""
    SubPool: str = ""
    Options: dict[str, str] | None = None
    V6: bool = False


class PoolRef(msgspec.Struct, frozen=True):
    PoolID: str


class RequestAddress(msgspec.Struct, frozen=True):
    PoolID: str
    Address: str = ""
    Options: dict[str, str] | None = None


class ReleaseAddress(msgspec.Struct, frozen=True):
    PoolID: str
    Address: str = ""


class Discovery(msgspec.Struct, frozen=True):
    DiscoveryType: int = 0
    DiscoveryData: Any = None


class Empty(msgspec.Struct, frozen=True):
    """A request whose body carries nothing we use (it may be empty or `{}`)."""
