"""The nftables renderer: a `Policy` (both families) in, the agent table's `State` out (pure).

Theory of operation
-------------------
The agent owns one table, `inet netagent`, for IPv4 and IPv6 together. Its base chains look a
packet's network up in verdict maps keyed by bridge name, and published ports in maps keyed by
address, protocol and port, so a packet's cost does not grow with the number of networks (the
iptables layout walks two or three rules per network on every forwarded packet)::

    chain forward      (filter, forward hook, priority filter, policy accept)
        jump user                                  the administrator's chain (DOCKER-USER)
        oifname vmap @to                           into bridge B: goto to-<id12>
        iifname vmap @from                         out of bridge B: goto from-<id12>
    chain to-<id12>                                (terminal: ends in a verdict)
        iifname != "B" iifname @bridges drop       isolation: from another agent bridge
        ct state established,related MARK accept   replies                  (not internal)
        iifname "B" MARK accept | iifname "B" drop ICC on | off
        ct status dnat oifname . ip daddr . meta l4proto . th dport @pub4 MARK accept
        ct status dnat oifname . ip6 daddr . meta l4proto . th dport @pub6 MARK accept
        drop                                       nothing else enters
    chain from-<id12>  MARK accept                 egress (internal: drop)
    chain postrouting  (nat, srcnat)
        ip saddr vmap @masq4 / ip6 saddr vmap @masq6   subnet S: jump masq-<id12>
        ip saddr 127.0.0.0/8 oifname @ported4 masquerade   localhost reaching a published port
        ip saddr . ip daddr . meta l4proto . th dport @hairpin4 masquerade   (and ip6)
    chain masq-<id12>  oifname != "B" masquerade
    chain prerouting / output  (nat, dstnat)
        fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @dnat4
        fib daddr type local dnat ip to meta l4proto . th dport map @dnat4any   (and ip6)

MARK is `meta mark set meta mark | 0x02000000`: an accept in one base chain does not survive a
drop in another on the same hook, so a host whose iptables FORWARD policy is DROP (Docker sets
it) needs one iptables rule accepting what this table accepted (see `coexist`).

This is the iptables layout's semantics (`agent.firewall.iptables.rules`) with the dispatch
made of lookups: `to-` holds the `-o B` half of `NETAGENT-N-<id12>` plus isolation stage 2,
`from-` its `-i B ! -o B` half (a packet with oifname B never reaches `from-`, since every
`to-` chain ends in a verdict). Port churn only adds and deletes map elements; a network's
chains change only when the network comes or goes. Forwards whose chain a network does not
own need no chain: the maps' keys carry the container address, which only its own bridge
routes to.

Every rule and element is written as `nft list` prints it, so a listed table parses back
(`script.parse_listing`) into a `State` equal to the rendered one.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from types import MappingProxyType

import msgspec

from agent.core.policy import FamilyPolicy, Forward, NetworkPolicy, Policy

FAMILY = "inet"
TABLE = "netagent"
USER = "user"
MARK = 0x02000000
MARK_ACCEPT = f"meta mark set meta mark | 0x{MARK:08x} accept"
LOCALHOST = "127.0.0.0/8"

#: base chains: name -> declaration (what `add chain` and `nft list` say after the name)
BASE_CHAINS: Mapping[str, str] = MappingProxyType(
    {
        "forward": "type filter hook forward priority filter; policy accept;",
        "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
        "prerouting": "type nat hook prerouting priority dstnat; policy accept;",
        "output": "type nat hook output priority -100; policy accept;",
    }
)

_PORT_KEY = "meta l4proto . th dport"
_DNAT4 = "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service"
_DNAT6 = "ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service"

#: sets and maps: name -> (kind, declaration lines as `nft list` prints them)
SETS: Mapping[str, tuple[str, tuple[str, ...]]] = MappingProxyType(
    {
        "bridges": ("set", ("type ifname",)),
        "to": ("map", ("type ifname : verdict",)),
        "from": ("map", ("type ifname : verdict",)),
        "masq4": ("map", ("type ipv4_addr : verdict", "flags interval")),
        "masq6": ("map", ("type ipv6_addr : verdict", "flags interval")),
        "dnat4": ("map", (f"type {_DNAT4}",)),
        "dnat4any": ("map", ("type inet_proto . inet_service : ipv4_addr . inet_service",)),
        "dnat6": ("map", (f"type {_DNAT6}",)),
        "dnat6any": ("map", ("type inet_proto . inet_service : ipv6_addr . inet_service",)),
        "pub4": ("set", ("type ifname . ipv4_addr . inet_proto . inet_service",)),
        "pub6": ("set", ("type ifname . ipv6_addr . inet_proto . inet_service",)),
        "hairpin4": ("set", ("type ipv4_addr . ipv4_addr . inet_proto . inet_service",)),
        "hairpin6": ("set", ("type ipv6_addr . ipv6_addr . inet_proto . inet_service",)),
        "ported4": ("set", ("type ifname",)),
    }
)


def _dnat(ip: str) -> tuple[str, ...]:
    fam = "ip" if ip == "ip" else "ip6"
    four = "4" if fam == "ip" else "6"
    return (
        f"fib daddr type local dnat {fam} to {fam} daddr . {_PORT_KEY} map @dnat{four}",
        f"fib daddr type local dnat {fam} to {_PORT_KEY} map @dnat{four}any",
    )


#: the base chains' rules (fixed: only map elements change with networks and ports)
BASE_RULES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "forward": (f"jump {USER}", "oifname vmap @to", "iifname vmap @from"),
        "postrouting": (
            "ip saddr vmap @masq4",
            "ip6 saddr vmap @masq6",
            f"ip saddr {LOCALHOST} oifname @ported4 masquerade",
            f"ip saddr . ip daddr . {_PORT_KEY} @hairpin4 masquerade",
            f"ip6 saddr . ip6 daddr . {_PORT_KEY} @hairpin6 masquerade",
        ),
        "prerouting": (*_dnat("ip"), *_dnat("ip6")),
        "output": (*_dnat("ip"), *_dnat("ip6")),
    }
)


class State(msgspec.Struct, frozen=True):
    """The agent table's content: every chain's rules (the user chain aside) and every set's
    elements, as `nft list` prints them."""

    chains: Mapping[str, tuple[str, ...]] = msgspec.field(default_factory=dict)
    elements: Mapping[str, frozenset[str]] = msgspec.field(default_factory=dict)

    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, State):
            return NotImplemented
        return dict(self.chains) == dict(other.chains) and _nonempty(self) == _nonempty(other)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.chains.items())))


def _nonempty(state: State) -> dict[str, frozenset[str]]:
    return {k: v for k, v in state.elements.items() if v}


# --- names and element builders: each docstring shows what it produces -----------------------


def to_chain(net: NetworkPolicy) -> str:
    """`to-<id12>`: traffic entering the network's bridge."""
    return f"to-{net.id[:12]}"


def from_chain(net: NetworkPolicy) -> str:
    """`from-<id12>`: traffic leaving the network's bridge for another interface."""
    return f"from-{net.id[:12]}"


def masq_chain(net: NetworkPolicy) -> str:
    """`masq-<id12>`: the network's subnet leaving by another interface."""
    return f"masq-{net.id[:12]}"


def quoted(ifname: str) -> str:
    """`"br-0123456789ab"`: an interface name as nft prints it."""
    return f'"{ifname}"'


def to_rules(net: NetworkPolicy) -> tuple[str, ...]:
    """The `to-<id12>` chain (see the module header)."""
    b = quoted(net.bridge)
    isolation = f"iifname != {b} iifname @bridges drop"
    icc = f"iifname {b} {MARK_ACCEPT if net.icc else 'drop'}"
    if net.internal:
        return (isolation, icc, "drop")
    return (
        isolation,
        f"ct state established,related {MARK_ACCEPT}",
        icc,
        f"ct status dnat oifname . ip daddr . {_PORT_KEY} @pub4 {MARK_ACCEPT}",
        f"ct status dnat oifname . ip6 daddr . {_PORT_KEY} @pub6 {MARK_ACCEPT}",
        "drop",
    )


def from_rules(net: NetworkPolicy) -> tuple[str, ...]:
    """`from-<id12>`: `MARK accept` (egress), or `drop` for an internal network."""
    return ("drop",) if net.internal else (MARK_ACCEPT,)


def masq_rules(net: NetworkPolicy) -> tuple[str, ...]:
    """`masq-<id12>`: `oifname != "B" masquerade`."""
    return (f"oifname != {quoted(net.bridge)} masquerade",)


def dnat_element(f: Forward) -> tuple[str, str]:
    """(map, element): `10.0.0.1 . tcp . 8080 : 172.18.0.2 . 80` in dnat4, or without a
    host address `tcp . 8080 : 172.18.0.2 . 80` in dnat4any (dnat6/dnat6any for IPv6)."""
    four = "6" if ":" in f.address else "4"
    value = f"{f.address} . {f.port}"
    if f.host_ip:
        return f"dnat{four}", f"{f.host_ip} . {f.protocol} . {f.host_port} : {value}"
    return f"dnat{four}any", f"{f.protocol} . {f.host_port} : {value}"


def pub_element(f: Forward, bridge: str) -> str:
    """`"br-x" . 172.18.0.2 . tcp . 80` (pub4/pub6): DNATed flows accepted into the bridge."""
    return f"{quoted(bridge)} . {f.address} . {f.protocol} . {f.port}"


def hairpin_element(f: Forward) -> str:
    """`172.18.0.2 . 172.18.0.2 . tcp . 80` (hairpin4/hairpin6): a container reaching itself."""
    return f"{f.address} . {f.address} . {f.protocol} . {f.port}"


# --- rendering ---------------------------------------------------------------------------------


def _networks(policy: Policy) -> list[NetworkPolicy]:
    """Every network once (the IPv6 policy holds a subset of the IPv4 one's, same flags)."""
    nets = {n.id: n for n in policy.v6.networks}
    nets.update({n.id: n for n in policy.v4.networks})
    return [nets[k] for k in sorted(nets)]


def _forwards(fam: FamilyPolicy, elements: dict[str, set[str]]) -> None:
    four = "6" if fam.family == 6 else "4"
    bridges = {n.id: n.bridge for n in fam.networks if not n.internal}
    for net_id, forwards in fam.forwards.items():
        bridge = bridges.get(net_id)
        if bridge is None or not forwards:
            continue
        if four == "4":
            elements["ported4"].add(quoted(bridge))
        for f in forwards:
            name, element = dnat_element(f)
            elements[name].add(element)
            elements[f"pub{four}"].add(pub_element(f, bridge))
            elements[f"hairpin{four}"].add(hairpin_element(f))


@functools.lru_cache(maxsize=8192)
def _network_parts(
    net: NetworkPolicy,
) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, str], ...], str]:
    """One network's chains and its bridge-keyed elements, memoised (a sync re-renders every
    network, most unchanged; `agent.core.policy` memoises the `NetworkPolicy` values)."""
    to, frm, b = to_chain(net), from_chain(net), quoted(net.bridge)
    chains = [(to, to_rules(net)), (frm, from_rules(net))]
    if net.masquerade and not net.internal:
        chains.append((masq_chain(net), masq_rules(net)))
    elements = (("bridges", b), ("to", f"{b} : goto {to}"), ("from", f"{b} : goto {frm}"))
    return tuple(chains), elements, b


@functools.lru_cache(maxsize=8192)
def masq_element(subnet: str, chain: str) -> str:
    """`172.18.0.0/16 : jump masq-<id12>` (masq4/masq6; the subnet canonical)."""
    return f"{ipaddress.ip_network(subnet, strict=False)} : jump {chain}"


def render(policy: Policy) -> State:
    """The table content that enforces `policy` (both families).

    Raises:
        ValueError: two networks map to the same chains or bridge, or two forwards to the
            same map key (the service refuses both before they get here).
    """
    chains: dict[str, tuple[str, ...]] = dict(BASE_RULES)
    elements: dict[str, set[str]] = {name: set() for name in SETS}
    for net in _networks(policy):
        own, keyed, bridge = _network_parts(net)
        if own[0][0] in chains or bridge in elements["bridges"]:
            raise ValueError(f"networks collide on chain {own[0][0]} or bridge {net.bridge}")
        chains.update(own)
        for name, element in keyed:
            elements[name].add(element)
    for fam in (policy.v4, policy.v6):
        masq = elements["masq6" if fam.family == 6 else "masq4"]
        for n in fam.networks:
            if n.masquerade and not n.internal:
                masq.add(masq_element(n.subnet, masq_chain(n)))
        _forwards(fam, elements)
    for name in ("dnat4", "dnat4any", "dnat6", "dnat6any"):
        keys = [e.split(" : ", 1)[0] for e in elements[name]]
        if len(keys) != len(set(keys)):
            raise ValueError(f"two published ports share a key in {name}")
    return State(chains, {k: frozenset(v) for k, v in elements.items()})
