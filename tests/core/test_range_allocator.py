"""RangeAllocator: a case table on both twins, then random operation sequences run in lockstep on
the pure twin, the Cython extension (when built) and a trivial set-based model."""

from __future__ import annotations

import importlib
import itertools
import os
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent import accel
from agent.core import bitmap as pure
from agent.core.bitmap import CLAIMED, FIXED, IN_USE

try:
    fast: Any = importlib.import_module("_fast.bitmap")
except ImportError:  # the extension is optional
    fast = None

IMPLS = [
    pytest.param(pure.RangeAllocator, id="pure"),
    pytest.param(
        fast.RangeAllocator if fast else None,
        id="cython",
        marks=pytest.mark.skipif(fast is None, reason="_fast.bitmap is not built"),
    ),
]


class Model:
    """The obvious specification: Python sets and a linear scan from the cursor."""

    def __init__(self, size: int, lo: int, hi: int, fixed: Any = ()) -> None:
        if size < 1:
            raise ValueError(size)
        if not 0 <= lo <= hi <= size:
            raise ValueError((lo, hi))
        if any(not 0 <= i < size for i in fixed):
            raise ValueError(fixed)
        self.size, self.lo, self.hi = size, lo, hi
        self._fixed = set(fixed)
        self.taken: set[int] = set()
        self.cursor = lo

    def _check(self, i: int) -> None:
        if not 0 <= i < self.size:
            raise IndexError(i)

    def allocate(self) -> int:
        order = itertools.chain(range(self.cursor, self.hi), range(self.lo, self.cursor))
        found = next((i for i in order if i not in self.taken and i not in self._fixed), -1)
        if found >= 0:
            self.taken.add(found)
            self.cursor = found + 1 if found + 1 < self.hi else self.lo
        return found

    def claim(self, i: int) -> int:
        self._check(i)
        if i in self._fixed:
            return FIXED
        if i in self.taken:
            return IN_USE
        self.taken.add(i)
        return CLAIMED

    def release(self, i: int) -> bool:
        self._check(i)
        if i not in self.taken:
            return False
        self.taken.remove(i)
        return True

    def is_allocated(self, i: int) -> bool:
        self._check(i)
        return i in self.taken

    def is_fixed(self, i: int) -> bool:
        self._check(i)
        return i in self._fixed

    def set_cursor(self, value: int) -> None:
        if not self.lo <= value <= self.hi:
            raise ValueError(value)
        self.cursor = self.lo if value == self.hi else value

    @property
    def fixed(self) -> tuple[int, ...]:
        return tuple(sorted(self._fixed))

    @property
    def capacity(self) -> int:
        return self.hi - self.lo - sum(self.lo <= i < self.hi for i in self._fixed)

    @property
    def used(self) -> int:
        return sum(self.lo <= i < self.hi for i in self.taken)

    @property
    def free(self) -> int:
        return self.capacity - self.used


STATE = ("cursor", "used", "free", "capacity", "size", "lo", "hi", "fixed")


def state(impl: Any) -> tuple[Any, ...]:
    return tuple(getattr(impl, name) for name in STATE)


# --- case table, on each twin -----------------------------------------------------------------


@pytest.mark.parametrize("cls", IMPLS)
class TestCases:
    def test_fills_in_order_then_full_is_minus_one(self, cls: type) -> None:
        r = cls(8, 0, 8, [0, 1, 7])  # a /29: network, gateway, broadcast
        assert (r.capacity, r.free, r.cursor) == (5, 5, 0)
        assert [r.allocate() for _ in range(5)] == [2, 3, 4, 5, 6]
        assert r.allocate() == -1
        assert r.allocate() == -1
        assert (r.used, r.free, r.cursor) == (5, 0, 7)  # a failed allocation leaves the cursor

    def test_round_robin_does_not_reuse_at_once_and_wraps(self, cls: type) -> None:
        r = cls(16, 4, 12)  # no fixed offset, a range not starting at 0
        assert [r.allocate() for _ in range(2)] == [4, 5]
        assert r.release(4)
        assert r.allocate() == 6  # not the offset just released
        assert [r.allocate() for _ in range(5)] == [7, 8, 9, 10, 11]
        assert r.cursor == 4  # wrapped to lo at hi
        assert r.allocate() == 4
        assert r.release(9) and r.release(5)
        assert r.allocate() == 5
        assert r.cursor == 6
        assert r.allocate() == 9
        assert r.allocate() == -1

    def test_slash30_holds_one_offset(self, cls: type) -> None:
        r = cls(4, 0, 4, [0, 1, 3])
        assert (r.capacity, r.free) == (1, 1)
        assert r.allocate() == 2
        assert r.allocate() == -1
        assert r.release(2)
        assert r.allocate() == 2

    def test_fixed_never_handed_out_nor_released(self, cls: type) -> None:
        fixed = [0, 1, 5, 64, 99, 130]  # 130 lies outside the range
        r = cls(131, 0, 100, fixed)
        assert r.capacity == 100 - 5
        got = [r.allocate() for _ in range(r.capacity)]
        assert r.allocate() == -1
        assert sorted(got) == [i for i in range(100) if i not in fixed]
        for i in fixed:
            assert r.is_fixed(i)
            assert not r.is_allocated(i)
            assert not r.release(i)
            assert r.claim(i) == FIXED
        assert r.fixed == tuple(fixed)
        assert r.used == r.capacity

    def test_claim_in_use_fixed_and_outside_the_range(self, cls: type) -> None:
        r = cls(256, 128, 256, [0, 254, 255])  # ip range .128/25, gateway .254
        assert (r.capacity, r.cursor) == (126, 128)
        assert r.claim(7) == CLAIMED  # a static address outside the dynamic range
        assert (r.used, r.cursor) == (0, 128)
        assert r.claim(7) == IN_USE
        assert r.claim(130) == CLAIMED
        assert (r.used, r.cursor) == (1, 128)  # counted, the cursor stays
        assert [r.allocate() for _ in range(3)] == [128, 129, 131]
        assert r.claim(129) == IN_USE
        assert r.claim(254) == FIXED
        assert r.is_allocated(7) and r.is_allocated(131) and not r.is_allocated(132)
        assert r.release(7) and not r.release(7)
        assert r.used == 4

    def test_cursor_restore(self, cls: type) -> None:
        r = cls(256, 0, 256, [0, 1, 255])
        r.set_cursor(200)
        assert r.allocate() == 200
        r.set_cursor(256)  # just past the end wraps to lo, then skips the fixed offsets
        assert r.cursor == 0
        assert r.allocate() == 2
        for bad in (-1, 257):
            with pytest.raises(ValueError, match=rf"cursor {bad} is outside the range \[0, 256\]"):
                r.set_cursor(bad)
        assert r.cursor == 3
        s = cls(256, 128, 192)
        with pytest.raises(ValueError, match=r"\[128, 192\]"):
            s.set_cursor(5)
        s.set_cursor(190)
        assert [s.allocate() for _ in range(3)] == [190, 191, 128]

    def test_empty_range(self, cls: type) -> None:
        r = cls(10, 5, 5, [5])
        assert (r.capacity, r.free, r.cursor) == (0, 0, 5)
        assert r.allocate() == -1
        r.set_cursor(5)
        assert r.claim(4) == CLAIMED and r.used == 0

    @pytest.mark.parametrize(
        ("args", "match"),
        [
            ((0, 0, 0), "size must be at least 1"),
            ((10, 6, 5), r"range \[6, 5\) outside \[0, 10\)"),
            ((10, -1, 5), r"range \[-1, 5\)"),
            ((10, 0, 11), r"range \[0, 11\)"),
            ((10, 0, 10, [3, 10]), r"fixed offset 10 outside \[0, 10\)"),
            ((10, 0, 10, [-1]), "fixed offset -1"),
        ],
    )
    def test_bad_construction(self, cls: type, args: tuple[Any, ...], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            cls(*args)

    @pytest.mark.parametrize("i", [-1, 70])
    def test_index_out_of_range(self, cls: type, i: int) -> None:
        r = cls(70, 0, 70)
        for op in (r.claim, r.release, r.is_allocated, r.is_fixed):
            with pytest.raises(IndexError, match=rf"offset {i} out of range \[0, 70\)"):
                op(i)

    def test_nearly_full_slash8_jumps_and_wraps(self, cls: type) -> None:
        size = 1 << 24
        r = cls(size, 0, size, [0, 1, size - 1])
        for i in range(size - 70_000, size - 2):  # a dense block up to the last host offset
            r.claim(i)
        r.set_cursor(size - 70_000)
        assert r.allocate() == size - 2  # jumps over the block through the summary tree
        assert r.allocate() == 2  # then wraps past the fixed network and gateway offsets
        assert r.free == size - 3 - 70_000 + 2 - 2


def test_accel_selects_the_extension_when_built() -> None:
    forced_pure = os.environ.get("NETAGENT_PURE") == "1"
    expected = pure if forced_pure or fast is None else fast
    assert accel.RangeAllocator is expected.RangeAllocator


# --- differential: model, pure twin and extension in lockstep ---------------------------------


class Twins(RuleBasedStateMachine):
    """Every operation gives the same answer (or the same error) on all implementations, and
    the visible state (cursor, counters, range, fixed offsets) agrees after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.impls: list[Any] = []

    @initialize(data=st.data())
    def make(self, data: st.DataObject) -> None:
        size = data.draw(
            st.one_of(st.integers(1, 300), st.sampled_from([64, 65, 127, 128, 129, 4096, 4161])),
            label="size",
        )
        lo = data.draw(st.integers(0, size), label="lo")
        hi = data.draw(st.integers(lo, size), label="hi")
        fixed = data.draw(st.lists(st.integers(0, size - 1), max_size=6), label="fixed")
        if data.draw(st.booleans(), label="ends fixed"):
            fixed += [0, size - 1]  # network and broadcast, as a subnet has them
        self.size, self.lo, self.hi = size, lo, hi
        args = (size, lo, hi, fixed)
        self.impls = [Model(*args), pure.RangeAllocator(*args)]
        if fast is not None:
            self.impls.append(fast.RangeAllocator(*args))

    def _same(self, name: str, *args: int) -> Any:
        results: list[Any] = []
        for impl in self.impls:
            try:
                results.append(getattr(impl, name)(*args))
            except (IndexError, ValueError) as exc:
                results.append(type(exc))
        assert all(r == results[0] for r in results), (name, args, results)
        return results[0]

    def _offset(self, data: st.DataObject) -> int:
        return data.draw(st.one_of(st.integers(0, self.size - 1), st.integers(-2, self.size + 2)))

    @precondition(lambda self: self.impls)
    @rule()
    def allocate(self) -> None:
        found = self._same("allocate")
        assert found == -1 or self.lo <= found < self.hi

    @precondition(lambda self: self.impls)
    @rule(n=st.integers(1, 400))
    def allocate_many(self, n: int) -> None:
        """Long runs fill the range, so that full words, summary words and -1 are reached."""
        for _ in range(n):
            if self._same("allocate") < 0:
                break

    @precondition(lambda self: self.impls)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        self._same("claim", self._offset(data))

    @precondition(lambda self: self.impls)
    @rule(data=st.data())
    def claim_run(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.size - 1))
        for i in range(start, min(self.size, start + data.draw(st.integers(1, 200)))):
            self._same("claim", i)

    @precondition(lambda self: self.impls)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self._same("release", self._offset(data))

    @precondition(lambda self: self.impls and self.impls[0].taken)
    @rule(data=st.data())
    def release_taken(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(self.impls[0].taken)))
        assert self._same("release", i) is True

    @precondition(lambda self: self.impls)
    @rule(data=st.data())
    def queries(self, data: st.DataObject) -> None:
        i = self._offset(data)
        self._same("is_allocated", i)
        self._same("is_fixed", i)

    @precondition(lambda self: self.impls)
    @rule(data=st.data())
    def set_cursor(self, data: st.DataObject) -> None:
        self._same("set_cursor", data.draw(st.integers(self.lo - 2, self.hi + 2)))

    @invariant()
    def state_agrees(self) -> None:
        if self.impls:
            states = [state(impl) for impl in self.impls]
            assert all(s == states[0] for s in states), states


TestTwins = Twins.TestCase
TestTwins.settings = settings(max_examples=80, stateful_step_count=60, deadline=None)


@pytest.mark.skipif(fast is None, reason="_fast.bitmap is not built")
@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("claim", (-5,)),
        ("release", (1 << 20,)),
        ("set_cursor", (1 << 70,)),
        ("is_fixed", (300,)),
    ],
)
def test_twins_raise_the_same_message(op: str, args: tuple[int, ...]) -> None:
    messages = []
    for cls in (pure.RangeAllocator, fast.RangeAllocator):
        r = cls(300, 10, 200, [0, 299])
        with pytest.raises((IndexError, ValueError)) as info:
            getattr(r, op)(*args)
        messages.append((info.type, str(info.value)))
    assert messages[0] == messages[1]


def test_twins_agree_on_a_long_random_run() -> None:
    """A seeded run far longer than hypothesis's, on a size with three summary levels and a
    range aligned to nothing; allocations are checked against the model's sets."""
    rng = random.Random(11)
    size = 64 * 64 * 64 + 4097
    lo, hi = 1234, size - 777
    fixed = [0, 1, 5000, 70_001, size - 1]
    impls: list[Any] = [pure.RangeAllocator(size, lo, hi, fixed)]
    if fast is not None:
        impls.append(fast.RangeAllocator(size, lo, hi, fixed))
    taken: set[int] = set()

    def same(op: str, *args: int) -> Any:
        results = [getattr(impl, op)(*args) for impl in impls]
        assert len(set(results)) == 1, (op, args, results)
        return results[0]

    for _ in range(3_000):
        op = rng.choice(("run", "alloc", "alloc", "release", "claim", "cursor"))
        i = rng.randrange(size)
        if op == "run":
            for j in range(i, min(size, i + rng.randrange(1, 3000))):
                if same("claim", j) == CLAIMED:
                    taken.add(j)
        elif op == "alloc":
            for _ in range(rng.randrange(1, 50)):
                got = same("allocate")
                if got < 0:
                    assert impls[0].free == 0
                    break
                assert got not in taken and got not in fixed and lo <= got < hi
                taken.add(got)
        elif op == "release":
            j = rng.choice(sorted(taken)) if taken and rng.random() < 0.8 else i
            assert same("release", j) == (j in taken)
            taken.discard(j)
        elif op == "claim":
            assert same("claim", i) == (FIXED if i in fixed else IN_USE if i in taken else CLAIMED)
            taken.add(i)
        else:
            same("set_cursor", rng.randrange(lo, hi + 1))
        assert len({state(impl) for impl in impls}) == 1
    assert impls[0].used == sum(lo <= j < hi for j in taken)
