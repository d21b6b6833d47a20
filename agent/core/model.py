"""The topology the agent owns: networks, endpoints and agent-managed sandboxes.

Values are frozen msgspec Structs; they are what the store persists and what the wire shows.
Addresses are kept as canonical strings (`str(ipaddress.ip_address(...))`).
"""

from __future__ import annotations

import msgspec


class Network(msgspec.Struct, frozen=True, kw_only=True):
    """A bridge network: one Linux bridge, one subnet, its firewall rules."""

    id: str  # 64 hex characters, like Docker's network IDs
    name: str
    bridge: str  # kernel name of the bridge device
    subnet: str  # CIDR, canonical (network address)
    gateway: str  # address of the bridge inside `subnet`
    ip_range: str | None = None  # sub-CIDR that dynamic allocation draws from
    internal: bool = False  # no default route, no masquerade, no traffic out of the subnet
    icc: bool = True  # inter-container communication on the same network
    masquerade: bool = True
    mtu: int = 1500
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    aux_addresses: dict[str, str] = msgspec.field(default_factory=dict)  # never handed out
    is_default: bool = False  # the `bridge` network created at start-up
    ipv6: bool = False  # dual stack: the fields below are set
    subnet6: str | None = None  # IPv6 CIDR, canonical
    gateway6: str | None = None  # IPv6 address of the bridge inside `subnet6`
    created: float = 0.0  # unix time, set by the service
    dns: bool = True  # names answered on the gateway (`agent.core.names.dns_enabled`)


class PortMapping(msgspec.Struct, frozen=True, kw_only=True, order=True):
    """One published port: HOST_IP:HOST_PORT/PROTOCOL on the host DNATs to the endpoint's port.

    A published range is stored as one mapping per port (what the rules and conntrack see).
    """

    protocol: str  # "tcp" or "udp"
    host_port: int
    container_port: int
    host_ip: str = ""  # "" = every local address (Docker's 0.0.0.0)


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A namespace attached to a network through a veth pair, or an endpoint reserved for
    one (Docker's CreateEndpoint before Join): addresses and MAC taken, `netns` still "".
    """

    id: str  # 64 hex characters
    network_id: str
    netns: str  # the path the client named (/run/netns/NAME or /proc/PID/ns/net ...); "" reserved
    netns_key: str  # "dev:inode" of the namespace: identifies it whatever the path; "" reserved
    ifname: str  # name inside the namespace (eth0, eth1, ...); "" reserved without a name
    host_ifname: str  # host end of the veth pair, enslaved to the bridge
    ip: str
    mac: str
    sandbox: str | None = None  # name of the agent-managed namespace, if created by `run`
    default_route: bool = False  # this endpoint holds the namespace's default route
    ports: tuple[PortMapping, ...] = ()  # published ports, sorted
    ip6: str | None = None  # IPv6 address (dual-stack networks only)
    attachment: str = ""  # an engine's key for it (CNI: CONTAINERID/IFNAME), unique if set
    aliases: tuple[str, ...] = ()  # DNS names on its network, normalised; the first is its name

    @property
    def joined(self) -> bool:
        """Whether it is attached to a namespace (not only reserved)."""
        return bool(self.netns_key)


class Sandbox(msgspec.Struct, frozen=True, kw_only=True):
    """A named network namespace the agent created (`agentctl run`) and will delete (`rm`)."""

    name: str
    path: str
    netns_key: str
