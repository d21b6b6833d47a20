"""Where two sequences differ: the span between their common head and common tail (pure).

A request changes one network among many: the list the service passes next is the last one
with an item appended (create), one taken out (rm) or one replaced, and a sorted tuple gets
one inserted. `changed_span` finds that span with list comparisons (C loops over pointers that
stop at the first item that is not the same object or equal: ~3 us for 1,000 items), a binary
search of them for the head and the tail, where a set of object identities took ~150 us.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def changed_span(old: Sequence[T], new: Sequence[T]) -> tuple[int, int]:
    """(head, tail): `old` and `new` (of one type: a list never equals a tuple) have their
    first `head` items and their last `tail` items equal (`head + tail` <= the shorter
    length), as long as possible; what differs is `old[head:len(old) - tail]` against
    `new[head:len(new) - tail]`."""
    if len(old) == len(new) and old == new:
        return len(old), 0
    shorter = min(len(old), len(new))
    head = _longest(lambda k: old[:k] == new[:k], shorter)
    room = shorter - head
    tail = _longest(lambda k: old[len(old) - k :] == new[len(new) - k :], room)
    return head, tail


def _longest(equal: Callable[[int], bool], most: int) -> int:
    """The largest k <= `most` with `equal(k)` (true for 0, monotone: true up to some k)."""
    if equal(most):  # the usual answer: one item appended, inserted or taken out
        return most
    lo, hi = 0, most - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if equal(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
