"""nft scripts between two `State`s, and the kernel's listing read back (pure).

Theory of operation. A script is the text of one `nft -f` run: libnftables sends all of it as
ONE netlink batch, so it commits whole or not at all.

- `diff(old, new)` is what a request sends: the set and map elements that went and came (and,
  should a future layout have chains that change, those chains declared, refilled or deleted
  after the elements that name them). Nothing is read from the kernel and nothing unchanged is
  sent: a network create among 1,000 sends its two to five elements.
- `full(new, stale)` converges from anything (start-up, repair): declares the table, every chain
  (the user chain only if missing: `add` never rewrites it), set and map, flushes the agent's
  chains and sets and refills them, and deletes `stale` chains (found in the kernel, not in
  `new`). Flush and refill are one transaction, so traffic never sees the table half-written.
- `parse_listing(text)` reads `nft list table inet netagent` back into a `State`, for drift
  checks (`drift`).

Chains are declared before sets and maps: in one batch, a verdict map element naming a chain
declared after its map fails with ENOENT (nftables 1.0.6); the renderer has no verdict map
today, the scripts keep the order anyway.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from agent.firewall.nftables.render import BASE_CHAINS, FAMILY, SETS, TABLE, USER, State

PREFIX = f"{FAMILY} {TABLE}"


def _add_elements(name: str, elements: Iterable[str]) -> list[str]:
    items = sorted(elements)
    return [f"add element {PREFIX} {name} {{ {', '.join(items)} }}"] if items else []


def _delete_elements(name: str, elements: Iterable[str]) -> list[str]:
    keys = sorted({e.split(" : ", 1)[0] for e in elements})
    return [f"delete element {PREFIX} {name} {{ {', '.join(keys)} }}"] if keys else []


def _declare_chain(name: str) -> str:
    spec = BASE_CHAINS.get(name)
    return f"add chain {PREFIX} {name}" + (f" {{ {spec} }}" if spec else "")


def _fill(name: str, rules: Iterable[str]) -> list[str]:
    return [f"add rule {PREFIX} {name} {rule}" for rule in rules]


def declarations() -> list[str]:
    """The table, its base chains, the user chain and every set and map (all idempotent)."""
    lines = [f"add table {PREFIX}", f"add chain {PREFIX} {USER}"]
    lines += [_declare_chain(name) for name in BASE_CHAINS]
    for name, (kind, spec) in SETS.items():
        lines.append(f"add {kind} {PREFIX} {name} {{ {'; '.join(spec)}; }}")
    return lines


def diff(old: State, new: State) -> list[str]:
    """The commands that turn a table holding `old` into one holding `new` (empty: equal)."""
    lines: list[str] = []
    fills: list[str] = []
    for name, rules in new.chains.items():
        before = old.chains.get(name)
        if before is None:
            lines.append(_declare_chain(name))
            fills += _fill(name, rules)
        elif before != rules:
            fills += [f"flush chain {PREFIX} {name}", *_fill(name, rules)]
    lines += fills
    adds: list[str] = []
    for name in SETS:
        was, now = old.elements.get(name, frozenset()), new.elements.get(name, frozenset())
        if was is not now and was != now:  # `is`: an unchanged set of 1,000 is not compared
            lines += _delete_elements(name, was - now)
            adds += _add_elements(name, now - was)
    lines += adds
    for name in sorted(set(old.chains) - set(new.chains)):
        lines += [f"flush chain {PREFIX} {name}", f"delete chain {PREFIX} {name}"]
    return lines


def full(
    new: State, stale: Collection[str] = (), stale_sets: Mapping[str, str] | None = None
) -> list[str]:
    """Converge the table from anything to `new`; `stale` chains are flushed and deleted, and
    so are `stale_sets` (name -> "set" or "map": an earlier layout's, nothing names them once
    the chains are flushed)."""
    lines = [f"add table {PREFIX}", f"add chain {PREFIX} {USER}"]
    lines += [_declare_chain(name) for name in new.chains]
    lines += declarations()[2 + len(BASE_CHAINS) :]  # the sets and maps
    lines += [f"flush chain {PREFIX} {name}" for name in new.chains]
    lines += [f"flush {SETS[name][0]} {PREFIX} {name}" for name in SETS]
    for name in sorted(stale):
        lines += [f"flush chain {PREFIX} {name}", f"delete chain {PREFIX} {name}"]
    lines += [f"delete {kind} {PREFIX} {n}" for n, kind in sorted((stale_sets or {}).items())]
    for name, rules in new.chains.items():
        lines += _fill(name, rules)
    for name in SETS:
        lines += _add_elements(name, new.elements.get(name, ()))
    return lines


def stale(seen: Collection[str], new: State) -> set[str]:
    """Chains found in the kernel that `new` does not hold (the user chain is never stale)."""
    return {c for c in seen if c not in new.chains and c != USER}


def stale_sets(seen: Listing) -> dict[str, str]:
    """Sets and maps found in the kernel that the layout does not have: name -> kind."""
    return {name: kind for name, kind in seen.kinds.items() if name not in SETS}


class Listing:
    """What `nft list table inet netagent` showed: chains (user chain included), the
    declaration lines of each base chain, set and map, and the elements."""

    def __init__(self) -> None:
        self.chains: dict[str, list[str]] = {}
        self.specs: dict[str, list[str]] = {}
        self.elements: dict[str, set[str]] = {}
        self.kinds: dict[str, str] = {}  # set or map name -> "set" or "map"

    def state(self) -> State:
        """The agent's part (the user chain aside), comparable with a rendered `State`."""
        chains = {c: tuple(r) for c, r in self.chains.items() if c != USER}
        return State(chains, {k: frozenset(v) for k, v in self.elements.items()})


def _split_elements(text: str) -> set[str]:
    body = text.strip().removeprefix("elements = {").removesuffix("}")
    return {item.strip() for item in body.split(",") if item.strip()}


def parse_listing(text: str) -> Listing:
    """Parse `nft list table inet netagent` (empty text: no table).

    Raises:
        ValueError: a line outside any chain, set or map.
    """
    seen = Listing()
    current: list[str] | None = None
    name = ""
    pending = ""  # an `elements = { ... }` block spread over several lines
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            pending += " " + line
            if line.endswith("}"):
                seen.elements[name] = _split_elements(pending)
                pending = ""
            continue
        if not line or line.startswith("table ") or line == "}":
            continue
        head = line.split()
        if head[0] in ("chain", "set", "map") and line.endswith("{"):
            name = head[1]
            if head[0] == "chain":
                current = seen.chains.setdefault(name, [])
            else:
                seen.elements.setdefault(name, set())
                seen.kinds[name] = head[0]
                current = None
            seen.specs.setdefault(name, [])
        elif line.startswith("elements = {"):
            if line.endswith("}"):
                seen.elements[name] = _split_elements(line)
            else:
                pending = line
        elif name and (line.startswith("type ") or line.startswith("flags ")):
            seen.specs[name].append(line)
        elif current is not None:
            current.append(line)
        else:
            raise ValueError(f"unexpected line in the nft listing: {line!r}")
    return seen


def drift(seen: Listing, new: State) -> list[str]:
    """What differs between the kernel (`seen`) and `new`, one line each (empty: nothing)."""
    problems = []
    if USER not in seen.chains:
        problems.append(f"chain {USER} recreated")
    for name, rules in new.chains.items():
        have = seen.chains.get(name)
        if have is None:
            problems.append(f"chain {name} recreated")
        elif tuple(have) != rules:
            problems.append(f"chain {name} rewritten")
    for name, (kind, _) in SETS.items():
        if name not in seen.elements:
            problems.append(f"{kind} {name} recreated")
        elif seen.elements[name] != new.elements.get(name, frozenset()):
            problems.append(f"{kind} {name} elements restored")
    problems += [f"chain {c} removed" for c in sorted(stale(seen.chains, new))]
    problems += [f"{kind} {name} removed" for name, kind in sorted(stale_sets(seen).items())]
    return problems


def listing(state: State) -> str:
    """The table as `nft list table inet netagent` prints it (elements sorted; user chain
    shown empty), for `agentctl ruleset`."""
    out = [f"table {PREFIX} {{"]
    for name, (kind, spec) in SETS.items():
        out.append(f"\t{kind} {name} {{")
        out += [f"\t\t{line}" for line in spec]
        items = sorted(state.elements.get(name, ()))
        if items:
            out.append(f"\t\telements = {{ {', '.join(items)} }}")
        out += ["\t}", ""]
    for name in [USER, *state.chains]:
        out.append(f"\tchain {name} {{")
        if name in BASE_CHAINS:
            out.append(f"\t\t{BASE_CHAINS[name]}")
        out += [f"\t\t{rule}" for rule in state.chains.get(name, ())]
        out += ["\t}", ""]
    out[-1] = "}"
    return "\n".join(out) + "\n"
