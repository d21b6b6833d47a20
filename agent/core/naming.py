"""Every name the kernel sees comes from here: bridges, veths, chains, ownership tags.

Kernel limits: interface names are at most 15 bytes (IFNAMSIZ - 1); iptables chain names at
most 28 characters (XT_EXTENSION_MAXNAMELEN - 1 minus room for the nft backend).
"""

from __future__ import annotations

import re

from agent.core.errors import InvalidArgument

IFNAMSIZ = 15
CHAIN_MAX = 28

DEFAULT_NETWORK = "bridge"
DEFAULT_BRIDGE = "netagent0"

CHAIN_PREFIX = "NETAGENT"
CHAIN_FORWARD = "NETAGENT-FORWARD"
CHAIN_USER = "NETAGENT-USER"
CHAIN_ISOLATION_1 = "NETAGENT-ISOLATION-STAGE-1"
CHAIN_ISOLATION_2 = "NETAGENT-ISOLATION-STAGE-2"
CHAIN_POSTROUTING = "NETAGENT-POSTROUTING"
CHAIN_DNAT = "NETAGENT-DNAT"  # nat: published ports, jumped to from PREROUTING and OUTPUT
CHAIN_ACCEPT = "NETAGENT-ACCEPT"  # filter: marks the flow (connmark) and accepts it
RULE_COMMENT = "netagent"

# Ownership visible in the kernel: IFLA_IFALIAS on the links we create, and a link group
# so that a crash's leftovers can be found (and deleted in one message) after a restart.
ALIAS_PREFIX = "netagent:"
LINK_GROUP = 0x4E41  # "NA"
DYING_GROUP = 0x4E44  # "ND": veths cut off by a disconnect, deleted together by the reaper

_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


def bridge_name(network_id: str) -> str:
    """`br-<first 12 hex of the id>`, Docker's naming (15 characters)."""
    return f"br-{network_id[:12]}"


def host_veth_name(endpoint_id: str) -> str:
    """Host end of an endpoint's veth pair: `na` + 13 hex (15 characters)."""
    return f"na{endpoint_id[:13]}"


def host_peer_name(endpoint_id: str) -> str:
    """The other end of a veth pair made in the host namespace, which an engine moves into its
    container and renames (Docker's Join): `nb` + 13 hex (15 characters)."""
    return f"nb{endpoint_id[:13]}"


#: `Endpoint.netns_key` of an endpoint whose namespace an engine makes after the Join (Docker
#: creates a container's namespace after its driver's Join; the key cannot be "dev:inode")
ENGINE_KEY_PREFIX = "engine:"


def engine_netns_key(sandbox_path: str) -> str:
    """The namespace key of an engine's sandbox known only by its path (Docker's SandboxKey)."""
    return f"{ENGINE_KEY_PREFIX}{sandbox_path}"


def container_ifname(index: int) -> str:
    """Name inside the namespace: eth0 for the first network, then eth1, ..."""
    return f"eth{index}"


def network_chain(network_id: str) -> str:
    """Per-network filter chain: `NETAGENT-N-<id12>` (23 characters)."""
    return f"{CHAIN_PREFIX}-N-{network_id[:12]}"


def ports_chain(network_id: str) -> str:
    """Per-network nat chain of published ports (DNAT): `NETAGENT-P-<id12>`."""
    return f"{CHAIN_PREFIX}-P-{network_id[:12]}"


def hairpin_chain(network_id: str) -> str:
    """Per-network nat chain masquerading hairpin and localhost traffic: `NETAGENT-H-<id12>`."""
    return f"{CHAIN_PREFIX}-H-{network_id[:12]}"


def bridge_alias(network_id: str) -> str:
    return f"{ALIAS_PREFIX}net:{network_id}"


def veth_alias(endpoint_id: str) -> str:
    return f"{ALIAS_PREFIX}ep:{endpoint_id}"


def parse_alias(alias: str | None) -> tuple[str, str] | None:
    """`("net"|"ep", id)` for an alias this agent wrote, else None (not ours). What follows
    the id after a `:` is the mark's payload (`agent.core.marks`)."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    kind, _, rest = alias[len(ALIAS_PREFIX) :].partition(":")
    ident = rest.partition(":")[0]
    if kind not in ("net", "ep") or not _HEX_ID.fullmatch(ident):
        return None
    return kind, ident


def validate_network_name(name: str) -> str:
    """`name` if it is a valid network name (Docker's rule; fullmatch: no trailing newline)."""
    if not _NETWORK_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid network name {name!r}: use 1-64 of [A-Za-z0-9_.-], starting alphanumeric",
            field="name",
        )
    return name


def validate_ifname(name: str, field: str = "ifname") -> str:
    """`name` if the kernel accepts it as an interface name; `field` names it in the error."""
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid interface name {name!r}: at most {IFNAMSIZ} characters of [A-Za-z0-9_.:-]",
            field=field,
        )
    return name


def validate_netns_name(name: str) -> str:
    """A name for /run/netns/NAME (a file name, no slashes)."""
    if not _NETNS_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid namespace name {name!r}: use [A-Za-z0-9_.-], starting alphanumeric",
            field="name",
        )
    return name
