"""`spans.changed_span` against a plain walk, for any two lists (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core.spans import changed_span

items = st.lists(st.integers(0, 4), max_size=12)


def walked(old: list[int], new: list[int]) -> tuple[int, int]:
    head = 0
    while head < min(len(old), len(new)) and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < min(len(old), len(new)) - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    return head, tail


@given(items, items)
def test_the_span_is_what_a_walk_finds(old: list[int], new: list[int]) -> None:
    assert changed_span(old, new) == walked(old, new)
    assert changed_span(tuple(old), tuple(new)) == walked(old, new)


def test_a_create_an_rm_and_an_insert() -> None:
    nets = list(range(1000))
    assert changed_span(nets, [*nets, 1000]) == (1000, 0)
    assert changed_span(nets, nets[:500] + nets[501:]) == (500, 499)
    assert changed_span(nets, [*nets[:10], -1, *nets[10:]]) == (10, 990)
    assert changed_span(nets, nets) == (1000, 0)
