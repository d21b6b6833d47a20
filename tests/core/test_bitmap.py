"""The bitmap allocator: case table, then random operation sequences run side by side on the
pure twin, the Cython extension (when built) and a trivial set-based model."""

from __future__ import annotations

import importlib
import itertools
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.core import bitmap as pure

try:
    fast: Any = importlib.import_module("_fast.bitmap")
except ImportError:  # the extension is optional
    fast = None

IMPLS = [pytest.param(pure.Bitmap, id="pure")]
IMPLS.append(
    pytest.param(
        fast.Bitmap if fast else None,
        id="cython",
        marks=pytest.mark.skipif(fast is None, reason="_fast.bitmap is not built"),
    )
)


class Model:
    """The obvious specification: a Python set of the set bits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bits: set[int] = set()

    @property
    def count(self) -> int:
        return len(self.bits)

    def test(self, i: int) -> bool:
        if not 0 <= i < self.size:
            raise IndexError(i)
        return i in self.bits

    def set(self, i: int) -> bool:
        was = self.test(i)
        self.bits.add(i)
        return not was

    def clear(self, i: int) -> bool:
        was = self.test(i)
        self.bits.discard(i)
        return was

    def find_clear(self, start: int) -> int:
        if start < 0:
            raise IndexError(start)
        start = 0 if start >= self.size else start
        order = itertools.chain(range(start, self.size), range(start))
        return next((i for i in order if i not in self.bits), -1)

    def take(self, start: int, lo: int, hi: int) -> int:
        if not 0 <= lo <= hi <= self.size:
            raise IndexError((lo, hi))
        start = start if lo <= start < hi else lo
        order = itertools.chain(range(start, hi), range(lo, start))
        found = next((i for i in order if i not in self.bits), -1)
        if found >= 0:
            self.bits.add(found)
        return found


@pytest.mark.parametrize("cls", IMPLS)
class TestCases:
    @pytest.mark.parametrize("size", [0, -1])
    def test_size_must_be_positive(self, cls: type, size: int) -> None:
        with pytest.raises(ValueError):
            cls(size)

    @pytest.mark.parametrize("size", [1, 63, 64, 65, 100, 4096, 4097, 262_145])
    def test_fill_in_order_then_full(self, cls: type, size: int) -> None:
        b = cls(size)
        assert (b.size, b.count) == (size, 0)
        for i in range(size):
            assert b.find_clear(i) == i
            assert b.set(i)
        assert b.count == size
        assert b.find_clear(0) == -1
        assert b.find_clear(size - 1) == -1

    def test_size_one(self, cls: type) -> None:
        b = cls(1)
        assert b.find_clear(0) == 0
        assert b.set(0) and not b.set(0)
        assert b.find_clear(0) == -1
        assert b.clear(0) and not b.clear(0)
        assert b.find_clear(0) == 0

    def test_wraps_around(self, cls: type) -> None:
        b = cls(100)
        for i in range(10, 100):
            b.set(i)
        assert b.find_clear(50) == 0
        assert b.find_clear(99) == 0
        b.set(0)
        assert b.find_clear(95) == 1

    def test_start_past_end_wraps_negative_raises(self, cls: type) -> None:
        b = cls(70)
        b.set(0)
        assert b.find_clear(70) == 1
        assert b.find_clear(10**6) == 1
        with pytest.raises(IndexError):
            b.find_clear(-1)

    @pytest.mark.parametrize("i", [-1, 70, 2**70])
    def test_index_out_of_range(self, cls: type, i: int) -> None:
        b = cls(70)
        for op in (b.test, b.set, b.clear):
            with pytest.raises(IndexError):
                op(i)

    def test_padding_is_never_found(self, cls: type) -> None:
        b = cls(65)  # second word holds one real bit and 63 padding bits
        for i in range(64):
            b.set(i)
        assert b.find_clear(0) == 64
        b.set(64)
        assert b.find_clear(3) == -1
        assert b.count == 65

    def test_slash8_climbs_the_summary_tree(self, cls: type) -> None:
        size = 1 << 24  # a /8: words, then 4096, 64 and 1 summary words
        b = cls(size)
        for i in range(1 << 16):  # 1024 full words: a whole level-1 summary word empties
            b.set(i)
        assert b.find_clear(0) == 1 << 16
        b.clear(5)
        assert b.find_clear(6) == 1 << 16
        assert b.find_clear(size - 1) == size - 1
        b.set(size - 1)
        assert b.find_clear(size - 1) == 5  # wraps from the very end
        b.set(5)
        assert b.find_clear(size - 1) == 1 << 16


class Twins(RuleBasedStateMachine):
    """Every operation on the pure twin, the extension and the model gives the same answer."""

    def __init__(self) -> None:
        super().__init__()
        self.impls: list[Any] = []
        self.size = 0

    @initialize(size=st.one_of(st.integers(1, 200), st.sampled_from([64, 128, 4096, 4161])))
    def make(self, size: int) -> None:
        self.size = size
        self.impls = [Model(size), pure.Bitmap(size)]
        if fast is not None:
            self.impls.append(fast.Bitmap(size))

    def _same(self, name: str, *args: int) -> Any:
        results = []
        for impl in self.impls:
            try:
                results.append(getattr(impl, name)(*args))
            except IndexError:
                results.append(IndexError)
        assert all(r == results[0] for r in results), (name, args, results)
        return results[0]

    def _index(self, data: st.DataObject) -> int:
        return data.draw(st.one_of(st.integers(0, self.size - 1), st.integers(-2, self.size + 2)))

    @rule(data=st.data())
    def set(self, data: st.DataObject) -> None:
        self._same("set", self._index(data))

    @rule(data=st.data())
    def set_run(self, data: st.DataObject) -> None:
        """Fill a stretch so that whole words and summary words become full."""
        lo = data.draw(st.integers(0, self.size - 1))
        for i in range(lo, min(self.size, lo + data.draw(st.integers(1, 300)))):
            self._same("set", i)

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        self._same("clear", self._index(data))

    @rule(data=st.data())
    def test(self, data: st.DataObject) -> None:
        self._same("test", self._index(data))

    @rule(data=st.data())
    def find_and_set(self, data: st.DataObject) -> None:
        found = self._same("find_clear", self._index(data))
        if found is not IndexError and found >= 0:
            self._same("set", found)

    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        lo = data.draw(st.integers(-1, self.size))
        hi = data.draw(st.integers(max(lo, 0), self.size + 1))
        self._same("take", self._index(data), lo, hi)

    @invariant()
    def counts_agree(self) -> None:
        if self.impls:
            assert len({impl.count for impl in self.impls}) == 1


TestTwins = Twins.TestCase
TestTwins.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_twins_agree_on_a_long_random_run() -> None:
    """A seeded run far longer than hypothesis's, over a size with three summary levels.

    Runs of consecutive sets fill whole words and summary words, so the tree climbs both ways.
    """
    rng = random.Random(7)
    size = 64 * 64 * 64 + 4097
    impls: list[Any] = [Model(size), pure.Bitmap(size)]
    if fast is not None:
        impls.append(fast.Bitmap(size))

    def same(op: str, i: int) -> Any:
        results = [getattr(impl, op)(i) for impl in impls]
        assert len(set(results)) == 1, (op, i, results)
        return results[0]

    for _ in range(4_000):
        op = rng.choice(("run", "set", "clear", "clear", "find_clear", "test"))
        i = rng.randrange(size)
        if op == "run":
            for j in range(i, min(size, i + rng.randrange(1, 3000))):
                same("set", j)
        else:
            found = same(op, i)
            if op == "find_clear" and found >= 0:
                same("set", found)
    assert len({impl.count for impl in impls}) == 1
