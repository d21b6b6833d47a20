"""Firewall rules: topology in, iptables ruleset and minimal transactions out (pure).

Theory of operation
-------------------
The agent owns only chains named `NETAGENT*`; the only lines it adds elsewhere are two jumps
from built-in chains, inserted at position 1 once and tagged `-m comment --comment netagent`:

    filter  FORWARD     -> NETAGENT-FORWARD
    nat     POSTROUTING -> NETAGENT-POSTROUTING

Docker's bridge driver (18.09-20.10 layout) is reproduced in our own chains::

    NETAGENT-FORWARD            -j NETAGENT-USER                 (fixed head: user rules first)
                                -j NETAGENT-ISOLATION-STAGE-1    (then cross-network isolation)
                                -o B -j C / -i B -j C            (per network: its own chain C)
    NETAGENT-ISOLATION-STAGE-1  -i B ! -o B -j NETAGENT-ISOLATION-STAGE-2
    NETAGENT-ISOLATION-STAGE-2  -o B -j DROP
    NETAGENT-POSTROUTING (nat)  -s S ! -o B -j MASQUERADE
    C = NETAGENT-N-<id12>       conntrack replies, egress, icc, then drop whatever else enters

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
bridge (set by the firewall shell) and the 127.0.0.0/8 masquerade, localhost reaches published
ports without a proxy. Port churn rewrites only the network's own P, H and C chains; the
dispatch chains change only when a network gains its first or loses its last port.

IPv6 (`render(..., family=6)`) is a second `Ruleset` of the same shape, fed to
ip6tables-restore: only dual-stack networks appear in it, with their IPv6 subnet, endpoint
addresses as `/128` and DNAT targets as `[C]:P`. A mapping with an IPv4 host address is
rendered only for IPv4, one with an IPv6 host address only for IPv6, one without both. There is
no IPv6 localhost rule: the kernel has no `route_localnet` for IPv6, so `::1` cannot be DNATed
out of a bridge (Docker needs its userland proxy for that too).

Every rule is written in the option order iptables-save prints, so a saved ruleset can be
compared line by line with the rendered one.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import msgspec

from agent.core import naming
from agent.core.model import Endpoint, Network, PortMapping

Rule = tuple[str, ...]
Op = tuple[str, str, Rule]  # ("-A" | "-D" | "-I" | "-F" | "-X", chain, args)
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
LOCALHOST = "127.0.0.0/8"

#: Dispatch chains and the length of their fixed head.
DISPATCH_HEADS: Mapping[ChainKey, int] = MappingProxyType(
    {
        (FILTER, FORWARD): 2,
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
    """`-A C -o B -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`: replies come in."""
    return ("-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")


def egress_accept(bridge: str) -> Rule:
    """`-A C -i B ! -o B -j ACCEPT`: the network may reach the outside (not internal)."""
    return ("-i", bridge, "!", "-o", bridge, "-j", "ACCEPT")


def icc(bridge: str, enabled: bool) -> Rule:
    """`-A C -i B -o B -j ACCEPT` (`-j DROP` when inter-container communication is off)."""
    return ("-i", bridge, "-o", bridge, "-j", "ACCEPT" if enabled else "DROP")


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


def _match_port(m: PortMapping, port: int) -> Rule:
    return ("-p", m.protocol, "-m", m.protocol, "--dport", str(port))


def _host(ip: str) -> str:
    """`C/32` or, for an IPv6 address, `C/128` (canonical, as the -save tools print it)."""
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def port_dnat(m: PortMapping, ip: str) -> Rule:
    """`-A P [-d HOST_IP/32] -p tcp -m tcp --dport H -j DNAT --to-destination C:P`.

    IPv6: `-d HOST_IP/128`, `--to-destination [C]:P`.
    """
    dest = ("-d", _host(m.host_ip)) if m.host_ip else ()
    where = f"[{ip}]" if ":" in ip else ip
    target = ("-j", "DNAT", "--to-destination", f"{where}:{m.container_port}")
    return (*dest, *_match_port(m, m.host_port), *target)


def port_accept(m: PortMapping, ip: str, bridge: str) -> Rule:
    """`-A C -d C/32 ! -i B -o B -p tcp -m tcp --dport P -m conntrack --ctstate DNAT -j ACCEPT`.

    Only DNATed flows: unlike Docker 20.10, a neighbour routing straight to C:P is dropped
    (Docker 28 added the same protection).
    """
    return ("-d", _host(ip), "!", "-i", bridge, "-o", bridge, *_match_port(m, m.container_port),
            "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT")  # fmt: skip


def port_hairpin(m: PortMapping, ip: str) -> Rule:
    """`-A H -s C/32 -d C/32 -p tcp -m tcp --dport P -j MASQUERADE`: C reaching itself."""
    return ("-s", _host(ip), "-d", _host(ip), *_match_port(m, m.container_port),
            "-j", "MASQUERADE")  # fmt: skip


def localhost_masquerade() -> Rule:
    """`-A H -s 127.0.0.0/8 -j MASQUERADE`: the host's localhost, DNATed out of the bridge."""
    return ("-s", LOCALHOST, "-j", "MASQUERADE")


def out_jump(bridge: str, chain: str) -> Rule:
    """`-A NETAGENT-POSTROUTING -o B -j H`."""
    return ("-o", bridge, "-j", chain)


PortsOf = tuple[tuple[str, tuple[PortMapping, ...]], ...]  # ((endpoint ip, its mappings), ...)


@functools.lru_cache(maxsize=4096)
def _port_parts(
    bridge: str, published: PortsOf
) -> tuple[tuple[Rule, ...], tuple[Rule, ...], tuple[Rule, ...]]:
    """(filter accepts for C, P chain, H chain) of one network's published ports."""
    v4 = not published or ":" not in published[0][0]
    accepts, dnat, hairpin = [], [], [localhost_masquerade()] if v4 else []
    for ip, mappings in published:
        for m in mappings:
            accepts.append(port_accept(m, ip, bridge))
            dnat.append(port_dnat(m, ip))
            hairpin.append(port_hairpin(m, ip))
    return tuple(accepts), tuple(dnat), tuple(hairpin)


def mapped_for(m: PortMapping, family: int) -> bool:
    """Whether mapping `m` is rendered for `family` (its host address decides, if any)."""
    return not m.host_ip or (":" in m.host_ip) == (family == 6)


def published_ports(endpoints: Iterable[Endpoint], family: int = 4) -> dict[str, PortsOf]:
    """Network id -> its endpoints' published ports for `family`, in a deterministic order.

    IPv6: only endpoints with an IPv6 address, and only mappings whose host address (if any)
    is IPv6; IPv4 likewise leaves out mappings bound to an IPv6 host address.
    """
    found: dict[str, list[tuple[str, tuple[PortMapping, ...]]]] = {}
    for ep in endpoints:
        ip = ep.ip if family == 4 else ep.ip6
        mappings = tuple(sorted(m for m in ep.ports if mapped_for(m, family)))
        if ip and mappings:
            found.setdefault(ep.network_id, []).append((ip, mappings))
    return {
        net: tuple(sorted(eps, key=lambda e: int(ipaddress.ip_address(e[0]))))
        for net, eps in found.items()
    }


# --- the ruleset value -------------------------------------------------------------------------


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

    def chains(self, table: str) -> Mapping[str, tuple[Rule, ...]]:
        """The chains of `table` (empty when the table holds none of ours)."""
        return self.tables.get(table, MappingProxyType({}))

    def items(self) -> Iterator[tuple[str, str, tuple[Rule, ...]]]:
        """`(table, chain, rules)` for every chain, tables in restore order, chains sorted."""
        for table in _ordered_tables(self.tables):
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


@functools.lru_cache(maxsize=8192)
def _network_parts(
    ident: str,
    bridge: str,
    subnet: str,
    internal: bool,
    icc_on: bool,
    masq: bool,
    family: int = 4,
) -> tuple[str, tuple[tuple[Rule, ...], Rule, Rule, tuple[Rule, Rule], tuple[Rule, ...]]]:
    """One network's rules, memoised: a sync re-renders every network, most unchanged."""
    if ipaddress.ip_network(subnet, strict=False).version != family:
        raise ValueError(f"IPv{family} rules need an IPv{family} subnet: {subnet}")
    chain = naming.network_chain(ident)
    nat = (masquerade(subnet, bridge),) if masq and not internal else ()
    own = network_chain_rules(bridge, internal=internal, icc_on=icc_on)
    return chain, (
        own,
        isolation_stage1(bridge),
        isolation_stage2(bridge),
        dispatch_rules(bridge, chain),
        nat,
    )


def render(
    networks: Iterable[Network], endpoints: Iterable[Endpoint] = (), *, family: int = 4
) -> Ruleset:
    """The desired ruleset of `networks` and the published ports of `endpoints`.

    Deterministic: networks sorted by id. Ports of endpoints whose network is not in
    `networks`, or is internal, are ignored. `family=6` renders the ip6tables ruleset of the
    dual-stack networks (their `subnet6`, the endpoints' `ip6`).

    Raises:
        ValueError: two networks map to the same chain, or a subnet is not of `family`.
    """
    if family == 6:
        networks = [
            msgspec.structs.replace(n, subnet=n.subnet6) for n in networks if n.ipv6 and n.subnet6
        ]
    forward: list[Rule] = [jump(USER), jump(ISOLATION_1)]
    stage1: list[Rule] = []
    stage2: list[Rule] = []
    postrouting: list[Rule] = []
    dnat: list[Rule] = []
    filter_chains: dict[str, tuple[Rule, ...]] = {}
    nat_chains: dict[str, tuple[Rule, ...]] = {}
    ports = published_ports(endpoints, family)
    for n in sorted(networks, key=lambda n: n.id):
        chain, parts = _network_parts(
            n.id, n.bridge, n.subnet, n.internal, n.icc, n.masquerade, family
        )
        if chain in filter_chains:
            raise ValueError(f"networks collide on chain {chain}")
        own, s1, s2, dispatch, masq = parts
        if n.id in ports and not n.internal:
            accepts, p_rules, h_rules = _port_parts(n.bridge, ports[n.id])
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
    filter_chains[ISOLATION_2] = tuple(stage2)
    nat_chains.update({POSTROUTING: tuple(postrouting), DNAT: tuple(dnat)})
    return Ruleset({FILTER: filter_chains, NAT: nat_chains}, DISPATCH_HEADS)


# --- transactions ------------------------------------------------------------------------------


class TableScript(NamedTuple):
    """One `*table ... COMMIT` section: chain declarations first, then ordered ops."""

    table: str
    declares: tuple[str, ...]
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Script:
    """An `iptables-restore --noflush` transaction; `len()` counts declarations plus ops."""

    tables: tuple[TableScript, ...] = ()

    def __len__(self) -> int:
        return sum(len(t.declares) + len(t.ops) for t in self.tables)


def _ordered_tables(tables: Iterable[str]) -> list[str]:
    names = set(tables)
    return [t for t in TABLE_ORDER if t in names] + sorted(names - set(TABLE_ORDER))


def _appends(chain: str, rules: Iterable[Rule]) -> list[Op]:
    return [("-A", chain, rule) for rule in rules]


def _dispatch_delta(chain: str, head: int, old: tuple[Rule, ...], new: tuple[Rule, ...]):
    """`-D` for the tail rules that went away, `-A` for the new ones (multiset difference).

    A dispatch chain holds a few rules per network (thousands with 1,000 networks) and one
    change touches a few: equal tails cost one tuple comparison, distinct rules (the usual
    case) a set difference; only duplicates need the multiset."""
    old_tail, new_tail = old[head:], new[head:]
    if old_tail == new_tail:
        return [], []
    before, after = set(old_tail), set(new_tail)
    if len(before) == len(old_tail) and len(after) == len(new_tail):
        went, came_in = before - after, after - before
        return (
            [("-D", chain, rule) for rule in old_tail if rule in went],
            [("-A", chain, rule) for rule in new_tail if rule in came_in],
        )
    gone = Counter(old_tail) - Counter(new_tail)
    came = Counter(new_tail) - Counter(old_tail)
    deletes: list[Op] = []
    for rule in old_tail:
        if gone[rule] > 0:
            gone[rule] -= 1
            deletes.append(("-D", chain, rule))
    adds: list[Op] = []
    for rule in new_tail:
        if came[rule] > 0:
            came[rule] -= 1
            adds.append(("-A", chain, rule))
    return deletes, adds


def _diff_table(old: Ruleset, new: Ruleset, table: str) -> TableScript:
    before, after = old.chains(table), new.chains(table)
    declares: list[str] = []
    deletes: list[Op] = []
    adds: list[Op] = []
    for chain in sorted(after):
        rules, head = after[chain], new.head(table, chain)
        same_head = head is not None and head == old.head(table, chain)
        if chain in before and same_head and rules[:head] == before[chain][:head]:
            dels, ads = _dispatch_delta(chain, head, before[chain], rules)
            deletes += dels
            adds += ads
            continue
        if chain in before and rules == before[chain] and head == old.head(table, chain):
            continue
        declares.append(chain)
        adds += _appends(chain, rules)
    removed = [chain for chain in sorted(before) if chain not in after]
    flushes = [("-F", chain, ()) for chain in removed]
    drops = [("-X", chain, ()) for chain in removed]
    return TableScript(table, tuple(declares), tuple(deletes + adds + flushes + drops))


def diff(old: Ruleset, new: Ruleset) -> Script:
    """The minimal `--noflush` transaction that turns the kernel's `old` into `new`.

    New or changed owned chains are declared (created or flushed) and rewritten; dispatch
    chains get `-D` for rules that went away and `-A` for new ones, head untouched; removed
    chains are flushed and deleted after every jump to them is gone.

    Sections come filter then nat, unless that order makes iptables-restore wait and the other
    does not: after a commit that deleted anything, loading an extension (MASQUERADE, DNAT, a
    match...) waits for an RCU grace period in nf_tables (15-30 ms; `network rm` is filter
    deletions, then a nat deletion naming MASQUERADE).
    """
    sections = []
    for table in _ordered_tables([*old.tables, *new.tables]):
        section = _diff_table(old, new, table)
        if section.declares or section.ops:
            sections.append(section)
    if len(sections) == 2:
        first, second = sections
        if _waits(first, second, old) and not _waits(second, first, old):
            sections = [second, first]
    return Script(tuple(sections))


_STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN"})


def _waits(first: TableScript, second: TableScript, old: Ruleset) -> bool:
    """Whether `second` loads an extension `first` did not, after `first` deleted something."""
    return _deletes(first, old) and not _extensions(second) <= _extensions(first)


def _deletes(section: TableScript, old: Ruleset) -> bool:
    """Whether the section removes rules: `-D`/`-F`/`-X`, or re-declares (flushes) a chain."""
    before = old.chains(section.table)
    return any(op in ("-D", "-F", "-X") for op, _, _ in section.ops) or any(
        chain in before for chain in section.declares
    )


def _extensions(section: TableScript) -> set[str]:
    """The extensions iptables-restore loads for the section: `-m`, `-p` and target names."""
    found = set()
    for _, _, args in section.ops:
        for flag, value in itertools.pairwise(args):
            if flag in ("-m", "-p") or (
                flag == "-j"
                and value not in _STANDARD_TARGETS
                and not value.startswith(naming.CHAIN_PREFIX)
            ):
                found.add(value)
    return found


def stale(existing: Iterable[ChainKey], new: Ruleset) -> set[ChainKey]:
    """Agent chains present in the kernel that `new` does not hold (NETAGENT-USER excluded)."""
    return {
        (table, chain)
        for table, chain in existing
        if chain.startswith(naming.CHAIN_PREFIX)
        and chain != USER
        and chain not in new.chains(table)
    }


def full(
    new: Ruleset,
    *,
    existing_chains: Collection[ChainKey] = (),
    missing_jumps: Iterable[tuple[str, str, Rule]] | None = None,
    user_chain_exists: bool = False,
    stale_chains: Collection[ChainKey] | None = None,
    flush_only: Collection[ChainKey] = (),
) -> Script:
    """Converge from anything: declare (flush) and rewrite every agent chain.

    Args:
        new: the desired ruleset.
        existing_chains: `(table, chain)` present in the kernel; used to find stale chains when
            `stale_chains` is None.
        missing_jumps: built-in jumps to insert at position 1 (default: all of them).
        user_chain_exists: when False, NETAGENT-USER is created with `-j RETURN`.
        stale_chains: `(table, chain)` to flush and delete (never NETAGENT-USER).
        flush_only: stale chains to flush but keep (a foreign rule still jumps to them).
    """
    jumps = builtin_jumps() if missing_jumps is None else list(missing_jumps)
    if stale_chains is None:
        stale_chains = stale(existing_chains, new)
    tables = {t for t, _, _ in jumps} | {t for t, _ in stale_chains} | set(new.tables)
    if not user_chain_exists:
        tables.add(FILTER)
    sections = []
    for table in _ordered_tables(tables):
        declares = sorted(new.chains(table))
        ops: list[Op] = []
        for chain in declares:
            ops += _appends(chain, new.chains(table)[chain])
        if table == FILTER and not user_chain_exists:
            declares.append(USER)
            ops.append(("-A", USER, user_return()))
        ops += [("-I", chain, ("1", *rule)) for t, chain, rule in jumps if t == table]
        gone = sorted(c for t, c in stale_chains if t == table and c != USER)
        ops += [("-F", chain, ()) for chain in gone]
        ops += [("-X", chain, ()) for chain in gone if (table, chain) not in flush_only]
        if declares or ops:
            sections.append(TableScript(table, tuple(declares), tuple(ops)))
    return Script(tuple(sections))
