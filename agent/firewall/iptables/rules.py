"""The iptables renderer: one family's `FamilyPolicy` in, its `Ruleset` out (pure).

Transactions between rulesets (`diff`, `full`) are `agent.firewall.iptables.transaction`.

Theory of operation
-------------------
The agent owns only chains named `NETAGENT*`; the only lines it adds elsewhere are jumps from
built-in chains, inserted at position 1 once and tagged `-m comment --comment netagent` (two,
and two more for published ports, below):

    filter  FORWARD     -> NETAGENT-FORWARD
    nat     POSTROUTING -> NETAGENT-POSTROUTING

Docker's bridge driver (18.09-20.10 layout) is reproduced in our own chains::

    NETAGENT-FORWARD            -j NETAGENT-USER                 (fixed head: user rules first)
                                -m connmark --mark 0x2000000/0x2000000 -m conntrack
                                --ctstate RELATED,ESTABLISHED -j ACCEPT   (flows already ours)
                                -j NETAGENT-ISOLATION-STAGE-1    (then cross-network isolation)
                                -o B -j C / -i B -j C            (per network: its own chain C)
    NETAGENT-ISOLATION-STAGE-1  -i B ! -o B -j NETAGENT-ISOLATION-STAGE-2
    NETAGENT-ISOLATION-STAGE-2  -o B -j DROP
    NETAGENT-POSTROUTING (nat)  -s S ! -o B -j MASQUERADE
    C = NETAGENT-N-<id12>       conntrack replies, egress, icc, then drop whatever else enters
    NETAGENT-ACCEPT             -j CONNMARK --set-xmark 0x2000000/0x2000000, -j ACCEPT

Every accept of a per-network chain is `-j NETAGENT-ACCEPT`, which sets one bit of the flow's
conntrack mark. The second rule of the head then accepts every later packet of a flow the
agent accepted, in both directions, before the per-network rules: the isolation and dispatch
rules (two or three per network, walked linearly) are paid by a flow's first packet only,
instead of by every packet (with 1,000 networks, 4-12x the RTT and a third of the throughput).
Same semantics: a flow is marked only when a per-network chain accepted it, after isolation,
and the chains accept the established packets of such a flow anyway (`conntrack_accept`,
egress, ICC); a flow the agent dropped (another network, ICC off, not published) is never
marked. The bit (0x2000000, the one the nftables backend marks packets with) is the agent's;
tools that use the conntrack mark should leave it alone.

Two kinds of chains:

* **dispatch** chains are shared by every network (FORWARD, both isolation stages, nat
  POSTROUTING). After a fixed head their rules are order-independent: isolation drops every
  packet between two agent bridges before dispatch, so at most one network's `-i`/`-o` rule can
  match a packet, and every per-network chain decides terminally. A transaction therefore only
  deletes (`-D`) and appends (`-A`) the rules of networks that come or go: O(changed).
* **owned** chains (one per network) are rewritten whole when they change: a declaration
  `:C - [0:0]` under `iptables-restore --noflush` creates the chain or flushes it.

`NETAGENT-USER` belongs to the administrator (like DOCKER-USER): created with `-j RETURN` only
when missing, never flushed or rewritten; it is not part of a `Ruleset`.

Published ports (Docker's hairpin mode, no userland proxy) add one nat dispatch chain and, for
each network with published ports, two owned nat chains::

    PREROUTING  -m addrtype --dst-type LOCAL -m comment --comment netagent -j NETAGENT-DNAT
    OUTPUT      -m addrtype --dst-type LOCAL -m comment --comment netagent -j NETAGENT-DNAT
    NETAGENT-DNAT               -j P                             (per network with ports)
    P = NETAGENT-P-<id12>       [-d HOST_IP/32] -p tcp -m tcp --dport H -j DNAT --to-destination C:P
    NETAGENT-POSTROUTING        -o B -j H                        (per network with ports)
    H = NETAGENT-H-<id12>       -s 127.0.0.0/8 -j MASQUERADE     (host's localhost reaching C)
                                -s C/32 -d C/32 -p tcp -m tcp --dport P -j MASQUERADE (hairpin)
    C (filter)                  -d C/32 ! -i B -o B -p tcp -m tcp --dport P
                                -m conntrack --ctstate DNAT -j ACCEPT
                                (just before the final `-o B -j DROP`)

Unlike Docker, the OUTPUT jump does not exclude 127.0.0.0/8: with `route_localnet=1` on the
bridge (set by the backend, see `agent.firewall.conntrack`) and the 127.0.0.0/8 masquerade,
localhost reaches published ports without a proxy. Port churn rewrites only the network's own
P, H and C chains; the dispatch chains change only when a network gains its first or loses its
last port.

IPv6 (`render(policy.v6)`) is a second `Ruleset` of the same shape, fed to ip6tables-restore:
only dual-stack networks appear in it (`agent.core.policy` decides which networks and forwards
each family holds), with their IPv6 subnet, endpoint addresses as `/128` and DNAT targets as
`[C]:P`. There is no IPv6 localhost rule: the kernel has no `route_localnet` for IPv6, so
`::1` cannot be DNATed out of a bridge (Docker needs its userland proxy for that too).

Every rule is written in the option order iptables-save prints, so a saved ruleset can be
compared line by line with the rendered one.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from types import MappingProxyType

from agent.core import naming
from agent.core.policy import FamilyPolicy, Forward, NetworkPolicy

Rule = tuple[str, ...]
ChainKey = tuple[str, str]  # (table, chain)

FILTER = "filter"
NAT = "nat"
TABLE_ORDER = (FILTER, NAT)

FORWARD = naming.CHAIN_FORWARD
USER = naming.CHAIN_USER
ISOLATION_1 = naming.CHAIN_ISOLATION_1
ISOLATION_2 = naming.CHAIN_ISOLATION_2
POSTROUTING = naming.CHAIN_POSTROUTING
DNAT = naming.CHAIN_DNAT
ACCEPT_CHAIN = naming.CHAIN_ACCEPT
LOCALHOST = "127.0.0.0/8"
#: the conntrack mark bit of flows a per-network chain accepted (`-j NETAGENT-ACCEPT`)
FLOW_MARK = "0x2000000/0x2000000"

#: Dispatch chains and the length of their fixed head.
DISPATCH_HEADS: Mapping[ChainKey, int] = MappingProxyType(
    {
        (FILTER, FORWARD): 3,
        (FILTER, ISOLATION_1): 0,
        (FILTER, ISOLATION_2): 0,
        (NAT, POSTROUTING): 0,
        (NAT, DNAT): 0,
    }
)


# --- rule builders: each docstring shows the line it produces --------------------------------


def jump(target: str) -> Rule:
    """`-j TARGET` (the fixed head of NETAGENT-FORWARD: `-j NETAGENT-USER`, ...)."""
    return ("-j", target)


def established_shortcut() -> Rule:
    """`-m connmark --mark 0x2000000/0x2000000 -m conntrack --ctstate RELATED,ESTABLISHED
    -j ACCEPT`: the rest of a flow a per-network chain accepted (third rule of the head)."""
    return ("-m", "connmark", "--mark", FLOW_MARK,
            "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")  # fmt: skip


def accept_rules() -> tuple[Rule, Rule]:
    """`-A NETAGENT-ACCEPT -j CONNMARK --set-xmark 0x2000000/0x2000000` then `-j ACCEPT`."""
    return ("-j", "CONNMARK", "--set-xmark", FLOW_MARK), ("-j", "ACCEPT")


def builtin_jump(target: str) -> Rule:
    """`-m comment --comment netagent -j TARGET` (the only rule outside our chains)."""
    return ("-m", "comment", "--comment", naming.RULE_COMMENT, "-j", target)


def user_return() -> Rule:
    """`-A NETAGENT-USER -j RETURN` (only when the user chain is created)."""
    return ("-j", "RETURN")


def isolation_stage1(bridge: str) -> Rule:
    """`-A NETAGENT-ISOLATION-STAGE-1 -i B ! -o B -j NETAGENT-ISOLATION-STAGE-2`."""
    return ("-i", bridge, "!", "-o", bridge, "-j", ISOLATION_2)


def isolation_stage2(bridge: str) -> Rule:
    """`-A NETAGENT-ISOLATION-STAGE-2 -o B -j DROP`: leaving another network into B."""
    return ("-o", bridge, "-j", "DROP")


def dispatch_rules(bridge: str, chain: str) -> tuple[Rule, Rule]:
    """`-A NETAGENT-FORWARD -o B -j C` and `-A NETAGENT-FORWARD -i B -j C`."""
    return ("-o", bridge, "-j", chain), ("-i", bridge, "-j", chain)


def conntrack_accept(bridge: str) -> Rule:
    """`-A C -o B -m conntrack --ctstate RELATED,ESTABLISHED -j NETAGENT-ACCEPT`: replies."""
    return ("-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
            "-j", ACCEPT_CHAIN)  # fmt: skip


def egress_accept(bridge: str) -> Rule:
    """`-A C -i B ! -o B -j NETAGENT-ACCEPT`: the network may reach the outside."""
    return ("-i", bridge, "!", "-o", bridge, "-j", ACCEPT_CHAIN)


def icc(bridge: str, enabled: bool) -> Rule:
    """`-A C -i B -o B -j NETAGENT-ACCEPT` (`-j DROP` when inter-container communication is
    off)."""
    return ("-i", bridge, "-o", bridge, "-j", ACCEPT_CHAIN if enabled else "DROP")


def drop_in(bridge: str) -> Rule:
    """`-A C -o B -j DROP`: nothing else enters, whatever the host's FORWARD policy."""
    return ("-o", bridge, "-j", "DROP")


def drop_out(bridge: str) -> Rule:
    """`-A C -i B -j DROP`: an internal network sends nothing off its bridge."""
    return ("-i", bridge, "-j", "DROP")


def masquerade(subnet: str, bridge: str) -> Rule:
    """`-A NETAGENT-POSTROUTING -s S ! -o B -j MASQUERADE` (S canonical, e.g. 172.18.0.0/16)."""
    return ("-s", canonical_subnet(subnet), "!", "-o", bridge, "-j", "MASQUERADE")


def canonical_subnet(subnet: str) -> str:
    """The network address form iptables-save prints: `172.18.0.0/16`."""
    return str(ipaddress.ip_network(subnet, strict=False))


def network_chain_rules(bridge: str, *, internal: bool, icc_on: bool) -> tuple[Rule, ...]:
    """The per-network chain C, in order (see the module header)."""
    if internal:
        return (icc(bridge, icc_on), drop_out(bridge), drop_in(bridge))
    return (conntrack_accept(bridge), egress_accept(bridge), icc(bridge, icc_on), drop_in(bridge))


def local_jump(target: str) -> Rule:
    """`-m addrtype --dst-type LOCAL -m comment --comment netagent -j TARGET`."""
    return ("-m", "addrtype", "--dst-type", "LOCAL", *builtin_jump(target))


def builtin_jumps() -> list[tuple[str, str, Rule]]:
    """`(table, built-in chain, rule)` of the jumps into our chains, comment included."""
    return [
        (FILTER, "FORWARD", builtin_jump(FORWARD)),
        (NAT, "POSTROUTING", builtin_jump(POSTROUTING)),
        (NAT, "PREROUTING", local_jump(DNAT)),
        (NAT, "OUTPUT", local_jump(DNAT)),
    ]


def _match_port(protocol: str, port: int) -> Rule:
    return ("-p", protocol, "-m", protocol, "--dport", str(port))


def _host(ip: str) -> str:
    """`C/32` or, for an IPv6 address, `C/128` (canonical, as the -save tools print it)."""
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def port_dnat(f: Forward) -> Rule:
    """`-A P [-d HOST_IP/32] -p tcp -m tcp --dport H -j DNAT --to-destination C:P`.

    IPv6: `-d HOST_IP/128`, `--to-destination [C]:P`.
    """
    dest = ("-d", _host(f.host_ip)) if f.host_ip else ()
    where = f"[{f.address}]" if ":" in f.address else f.address
    target = ("-j", "DNAT", "--to-destination", f"{where}:{f.port}")
    return (*dest, *_match_port(f.protocol, f.host_port), *target)


def port_accept(f: Forward, bridge: str) -> Rule:
    """`-A C -d C/32 ! -i B -o B -p tcp -m tcp --dport P -m conntrack --ctstate DNAT
    -j NETAGENT-ACCEPT`.

    Only DNATed flows: unlike Docker 20.10, a neighbour routing straight to C:P is dropped
    (Docker 28 added the same protection).
    """
    return ("-d", _host(f.address), "!", "-i", bridge, "-o", bridge,
            *_match_port(f.protocol, f.port),
            "-m", "conntrack", "--ctstate", "DNAT", "-j", ACCEPT_CHAIN)  # fmt: skip


def port_hairpin(f: Forward) -> Rule:
    """`-A H -s C/32 -d C/32 -p tcp -m tcp --dport P -j MASQUERADE`: C reaching itself."""
    return ("-s", _host(f.address), "-d", _host(f.address), *_match_port(f.protocol, f.port),
            "-j", "MASQUERADE")  # fmt: skip


def localhost_masquerade() -> Rule:
    """`-A H -s 127.0.0.0/8 -j MASQUERADE`: the host's localhost, DNATed out of the bridge."""
    return ("-s", LOCALHOST, "-j", "MASQUERADE")


def out_jump(bridge: str, chain: str) -> Rule:
    """`-A NETAGENT-POSTROUTING -o B -j H`."""
    return ("-o", bridge, "-j", chain)


# --- the ruleset value -------------------------------------------------------------------------


def ordered_tables(tables: Iterable[str]) -> list[str]:
    """Table names in restore order: filter, nat, then any other sorted."""
    names = set(tables)
    return [t for t in TABLE_ORDER if t in names] + sorted(names - set(TABLE_ORDER))


@dataclass(frozen=True, eq=False)
class Ruleset:
    """Immutable value: table -> chain -> rules, for agent chains only.

    `heads` names the dispatch chains and the length of their fixed head; every other chain is
    owned. Equality ignores the order of a dispatch chain's rules after its head, since the
    kernel's order there depends on the history of incremental transactions.
    """

    tables: Mapping[str, Mapping[str, tuple[Rule, ...]]] = field(default_factory=dict)
    heads: Mapping[ChainKey, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tables = {
            table: MappingProxyType({c: tuple(map(tuple, rs)) for c, rs in chains.items()})
            for table, chains in self.tables.items()
        }
        object.__setattr__(self, "tables", MappingProxyType(tables))
        object.__setattr__(self, "heads", MappingProxyType(dict(self.heads)))

    @classmethod
    def _rendered(
        cls, tables: dict[str, dict[str, tuple[Rule, ...]]], heads: Mapping[ChainKey, int]
    ) -> Ruleset:
        """The renderer's ruleset, taken as is: its chains are tuples of tuples already, its
        dicts are new and `heads` is read-only (copying thousands of chains costs ~0.2 ms)."""
        ruleset = object.__new__(cls)
        frozen = {table: MappingProxyType(chains) for table, chains in tables.items()}
        object.__setattr__(ruleset, "tables", MappingProxyType(frozen))
        object.__setattr__(ruleset, "heads", heads)
        return ruleset

    def chains(self, table: str) -> Mapping[str, tuple[Rule, ...]]:
        """The chains of `table` (empty when the table holds none of ours)."""
        return self.tables.get(table, MappingProxyType({}))

    def items(self) -> Iterator[tuple[str, str, tuple[Rule, ...]]]:
        """`(table, chain, rules)` for every chain, tables in restore order, chains sorted."""
        for table in ordered_tables(self.tables):
            for chain in sorted(self.tables[table]):
                yield table, chain, self.tables[table][chain]

    def head(self, table: str, chain: str) -> int | None:
        """Fixed head length of a dispatch chain, None for an owned chain."""
        return self.heads.get((table, chain))

    def rule_count(self) -> int:
        return sum(len(rules) for _, _, rules in self.items())

    def _key(self) -> tuple[tuple[str, str, int | None, tuple[Rule, ...]], ...]:
        key = []
        for table, chain, rules in self.items():
            head = self.head(table, chain)
            if head is not None:
                rules = rules[:head] + tuple(sorted(rules[head:]))
            key.append((table, chain, head, rules))
        return tuple(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ruleset):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


EMPTY = Ruleset()


# --- rendering ---------------------------------------------------------------------------------

NetworkParts = tuple[tuple[Rule, ...], Rule, Rule, tuple[Rule, Rule], tuple[Rule, ...]]


@functools.lru_cache(maxsize=8192)
def _network_parts(net: NetworkPolicy, family: int) -> tuple[str, NetworkParts]:
    """One network's rules, memoised: a sync re-renders every network, most unchanged.

    Keyed by the `NetworkPolicy` value, which `agent.core.policy` memoises in turn: an
    unchanged network is the same object from one policy to the next, so a hit costs one
    hash of its fields and an identity check.
    """
    if ipaddress.ip_network(net.subnet, strict=False).version != family:
        raise ValueError(f"IPv{family} rules need an IPv{family} subnet: {net.subnet}")
    chain = naming.network_chain(net.id)
    bridge = net.bridge
    nat = (masquerade(net.subnet, bridge),) if net.masquerade and not net.internal else ()
    own = network_chain_rules(bridge, internal=net.internal, icc_on=net.icc)
    return chain, (
        own,
        isolation_stage1(bridge),
        isolation_stage2(bridge),
        dispatch_rules(bridge, chain),
        nat,
    )


@functools.lru_cache(maxsize=4096)
def _port_parts(
    bridge: str, forwards: tuple[Forward, ...], family: int
) -> tuple[tuple[Rule, ...], tuple[Rule, ...], tuple[Rule, ...]]:
    """(filter accepts for C, P chain, H chain) of one network's forwards, memoised."""
    accepts, dnat, hairpin = [], [], [localhost_masquerade()] if family == 4 else []
    for f in forwards:
        accepts.append(port_accept(f, bridge))
        dnat.append(port_dnat(f))
        hairpin.append(port_hairpin(f))
    return tuple(accepts), tuple(dnat), tuple(hairpin)


def render(policy: FamilyPolicy) -> Ruleset:
    """The ruleset that enforces `policy` (one family) with iptables.

    Deterministic: networks sorted by id, each network's forwards in the policy's order.
    Forwards of a network not in the policy, or internal, are ignored.

    Raises:
        ValueError: two networks map to the same chain, or a subnet is not of the family.
    """
    family = policy.family
    forwards = policy.forwards
    forward: list[Rule] = [jump(USER), established_shortcut(), jump(ISOLATION_1)]
    stage1: list[Rule] = []
    stage2: list[Rule] = []
    postrouting: list[Rule] = []
    dnat: list[Rule] = []
    filter_chains: dict[str, tuple[Rule, ...]] = {}
    nat_chains: dict[str, tuple[Rule, ...]] = {}
    for n in sorted(policy.networks, key=attrgetter("id")):
        chain, parts = _network_parts(n, family)
        if chain in filter_chains:
            raise ValueError(f"networks collide on chain {chain}")
        own, s1, s2, dispatch, masq = parts
        published = forwards.get(n.id)
        if published and not n.internal:
            accepts, p_rules, h_rules = _port_parts(n.bridge, published, family)
            own = (*own[:-1], *accepts, own[-1])  # before the final `-o B -j DROP`
            p_chain, h_chain = naming.ports_chain(n.id), naming.hairpin_chain(n.id)
            nat_chains[p_chain], nat_chains[h_chain] = p_rules, h_rules
            dnat.append(jump(p_chain))
            postrouting.append(out_jump(n.bridge, h_chain))
        filter_chains[chain] = own
        stage1.append(s1)
        stage2.append(s2)
        forward.extend(dispatch)
        postrouting.extend(masq)
    filter_chains.update({FORWARD: tuple(forward), ISOLATION_1: tuple(stage1)})
    filter_chains[ACCEPT_CHAIN] = accept_rules()
    filter_chains[ISOLATION_2] = tuple(stage2)
    nat_chains.update({POSTROUTING: tuple(postrouting), DNAT: tuple(dnat)})
    return Ruleset._rendered({FILTER: filter_chains, NAT: nat_chains}, DISPATCH_HEADS)
