"""iptables-restore text from a transaction (pure twin of `_fast/serialize.pyx`).

Input: a `rules.Script` or the plain structure it holds, an iterable of
`(table, declares, ops)` with `ops` a sequence of `(op, chain, args)`. Output::

    *filter
    :NETAGENT-N-0123456789ab - [0:0]
    -A NETAGENT-N-0123456789ab -o br-0123456789ab -j DROP
    COMMIT

Quoting follows iptables-save (`xtables_save_string`): a token is written as is unless it is
empty or holds a space, a tab, a vertical tab, a form feed, a quote or a backslash; then it is
wrapped in double quotes with a backslash before each `"`, `'` and `\\`. iptables-restore reads
one line at a time, so a newline, carriage return or NUL in any token is a `ValueError`.
Both implementations must give byte-identical output (tests/core/test_serialize.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

#: Characters that make a token need quotes, plus the ones no line-based format can carry.
_SPECIAL = re.compile("[ \t\x0b\x0c\"'\\\\\n\r\x00]")
_FORBIDDEN = re.compile("[\n\r\x00]")


def quote(token: str) -> str:
    """`token` as iptables-restore must read it back: bare when safe, else double-quoted.

    Raises:
        ValueError: the token holds a newline, carriage return or NUL.
    """
    if token and _SPECIAL.search(token) is None:
        return token
    if _FORBIDDEN.search(token) is not None:
        raise ValueError(f"token cannot be written to iptables-restore: {token!r}")
    escaped = token.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'


def _name(name: str) -> str:
    if not name or _SPECIAL.search(name) is not None:
        raise ValueError(f"invalid table or chain name: {name!r}")
    return name


def format_op(op: str, chain: str, args: Sequence[str]) -> str:
    """One rule line, e.g. `-A NETAGENT-FORWARD -o br-x -j NETAGENT-N-x`."""
    tokens = (op, chain, *args)
    if "" not in tokens and _SPECIAL.search("".join(tokens)) is None:
        return " ".join(tokens)
    return " ".join([quote(op), _name(chain), *map(quote, args)])


def serialize(script: Any) -> str:
    """The iptables-restore text of `script` (a `rules.Script` or its `tables` structure)."""
    tables: Iterable[tuple[str, Sequence[str], Sequence[tuple[str, str, Sequence[str]]]]]
    tables = getattr(script, "tables", script)
    lines: list[str] = []
    for table, declares, ops in tables:
        lines.append("*" + _name(table))
        lines.extend([":" + _name(chain) + " - [0:0]" for chain in declares])
        lines.extend([format_op(op, chain, args) for op, chain, args in ops])
        lines.append("COMMIT")
    lines.append("")
    return "\n".join(lines)
