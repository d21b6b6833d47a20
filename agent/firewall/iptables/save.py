"""What the kernel holds, read back: `iptables-save` parsed, and drift against a ruleset (pure).

`parse_save` keeps only what concerns the agent (filter and nat): its own `NETAGENT*` chains
and their rules, every other chain's `-A` lines (to find the built-in jumps) and the agent
chains those lines jump to (a stale chain one of them names can be flushed, not deleted).
Tokens are read back as iptables-restore would read them (`split_line` undoes the quoting of
`serialize.quote`), so an `Observed.ruleset()` compares equal to the rendered one.

`drift` is the drift check of `repair` and of start-up: one line per difference, in the words
`agentctl reconcile` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.core import naming
from agent.firewall.iptables import rules
from agent.firewall.iptables.serialize import format_op
from agent.firewall.iptables.transaction import stale


@dataclass
class Observed:
    """What one `iptables-save` says about the agent's footprint (filter and nat only)."""

    chains: dict[rules.ChainKey, list[rules.Rule]] = field(default_factory=dict)  # NETAGENT*
    lines: dict[tuple[str, str], int] = field(default_factory=dict)  # other chains' -A lines
    foreign_refs: set[rules.ChainKey] = field(default_factory=set)  # our chains they jump to

    def user_chain_exists(self) -> bool:
        return (rules.FILTER, rules.USER) in self.chains

    def missing_jumps(self) -> list[tuple[str, str, rules.Rule]]:
        return [
            (table, chain, rule)
            for table, chain, rule in rules.builtin_jumps()
            if (table, format_op("-A", chain, rule)) not in self.lines
        ]

    def ruleset(self) -> rules.Ruleset:
        """The agent's chains as found (NETAGENT-USER aside), comparable with `applied`."""
        tables: dict[str, dict[str, tuple[rules.Rule, ...]]] = {}
        for (table, chain), found in self.chains.items():
            if chain != rules.USER:
                tables.setdefault(table, {})[chain] = tuple(found)
        heads = {k: h for k, h in rules.DISPATCH_HEADS.items() if k in self.chains}
        return rules.Ruleset(tables, heads)


def split_line(line: str) -> list[str]:
    """Tokens of an iptables-save line, undoing its quoting (as iptables-restore reads it)."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = in_quotes = escaped = False
    for char in line:
        if in_quotes and escaped:
            current.append(char)
            escaped = False
        elif in_quotes and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes, quoted = not in_quotes, True
        elif char in " \t" and not in_quotes:
            if current or quoted:
                tokens.append("".join(current))
            current, quoted = [], False
        else:
            current.append(char)
    if current or quoted:
        tokens.append("".join(current))
    return tokens


def parse_save(text: str) -> Observed:
    """Parse `iptables-save` output: our chains and rules, the jumps into them from elsewhere."""
    seen = Observed()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif table not in rules.TABLE_ORDER:
            continue
        elif line.startswith(":") and line[1:].startswith(naming.CHAIN_PREFIX):
            seen.chains.setdefault((table, line[1:].split(" ", 1)[0]), [])
        elif line.startswith("-A "):
            tokens = split_line(line)
            if tokens[1].startswith(naming.CHAIN_PREFIX):
                seen.chains.setdefault((table, tokens[1]), []).append(tuple(tokens[2:]))
                continue
            key = (table, line)
            seen.lines[key] = seen.lines.get(key, 0) + 1
            for i, token in enumerate(tokens[:-1]):
                if token in ("-j", "-g") and tokens[i + 1].startswith(naming.CHAIN_PREFIX):
                    seen.foreign_refs.add((table, tokens[i + 1]))
    return seen


def drift(seen: Observed, new: rules.Ruleset) -> list[str]:
    """What differs between the kernel (`seen`) and the desired ruleset, one line each."""
    problems = [f"jump {table}/{chain} restored" for table, chain, _ in seen.missing_jumps()]
    if not seen.user_chain_exists():
        problems.append(f"chain filter/{rules.USER} recreated")
    found = seen.ruleset()
    for table, chain, want in new.items():
        have = found.chains(table).get(chain)
        head = new.head(table, chain)  # dispatch chains: rule order after the head is free
        if have is None:
            problems.append(f"chain {table}/{chain} recreated")
        elif not _same_rules(have, want, head):
            problems.append(f"chain {table}/{chain} rewritten")
    problems += [f"chain {t}/{c} removed" for t, c in sorted(stale(seen.chains, new))]
    return problems


def _same_rules(have: Sequence[rules.Rule], want: Sequence[rules.Rule], head: int | None) -> bool:
    if head is None:
        return tuple(have) == tuple(want)
    return tuple(have[:head]) == tuple(want[:head]) and sorted(have[head:]) == sorted(want[head:])
