"""iptables-restore transactions between rulesets: `diff` (hot path), `full` (converge); pure.

Theory of operation. The kernel is assumed to hold `old` (the applier's `applied`); `diff`
gives the smallest `iptables-restore --noflush` script that turns it into `new`, using the two
kinds of chains of `agent.firewall.iptables.rules`: an owned chain that changed is declared
(`:C - [0:0]` creates or flushes it) and rewritten whole; a dispatch chain keeps its head and
gets `-D` for the rules that went away and `-A` for the new ones, so that a change costs what
changed, not what exists (a network added among 1,000 is 10 operations). `full` converges from
anything (start-up, repair): every agent chain declared and rewritten, the missing built-in
jumps inserted, NETAGENT-USER created if missing, stale agent chains flushed and deleted.

A `Script` holds one `TableScript` per `*table ... COMMIT` section; the serialiser
(`serialize.py` or `_fast/serialize.pyx`) writes it out.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from agent.core import naming
from agent.firewall.iptables.rules import (
    FILTER,
    USER,
    ChainKey,
    Rule,
    Ruleset,
    builtin_jumps,
    ordered_tables,
    user_return,
)

Op = tuple[str, str, Rule]  # ("-A" | "-D" | "-I" | "-F" | "-X", chain, args)


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


def _appends(chain: str, rules: Iterable[Rule]) -> list[Op]:
    return [("-A", chain, rule) for rule in rules]


def _dispatch_delta(
    chain: str, head: int, old: tuple[Rule, ...], new: tuple[Rule, ...]
) -> tuple[list[Op], list[Op]]:
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


def _heads(ruleset: Ruleset, table: str) -> dict[str, int]:
    """Chain -> head length of the dispatch chains of `table` (a dict lookup per chain beats a
    `Ruleset.head` call: thousands of chains per diff at 1,000 networks)."""
    return {chain: head for (t, chain), head in ruleset.heads.items() if t == table}


def _diff_table(old: Ruleset, new: Ruleset, table: str) -> TableScript:
    before, after = old.chains(table), new.chains(table)
    old_heads, new_heads = _heads(old, table), _heads(new, table)
    declares: list[str] = []
    deletes: list[Op] = []
    adds: list[Op] = []
    for chain in sorted(after):
        rules, head = after[chain], new_heads.get(chain)
        same_head = head is not None and head == old_heads.get(chain)
        if (
            head is not None
            and chain in before
            and same_head
            and rules[:head] == before[chain][:head]
        ):
            dels, ads = _dispatch_delta(chain, head, before[chain], rules)
            deletes += dels
            adds += ads
            continue
        if chain in before and rules == before[chain] and head == old_heads.get(chain):
            continue
        declares.append(chain)
        adds += _appends(chain, rules)
    removed = [chain for chain in sorted(before) if chain not in after]
    flushes: list[Op] = [("-F", chain, ()) for chain in removed]
    drops: list[Op] = [("-X", chain, ()) for chain in removed]
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
    for table in ordered_tables([*old.tables, *new.tables]):
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
    for table in ordered_tables(tables):
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
