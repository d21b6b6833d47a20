"""A fixed-size bitmap that finds the next clear bit fast: the pure-Python twin of `_fast.bitmap`.

Theory of operation: the bits live in 64-bit words (`1` = set). Above them sits a summary tree
of 64-ary levels: bit `w` of level 0 is `1` when word `w` still has a clear bit, bit `j` of level
`k + 1` is `1` when word `j` of level `k` is non-zero, up to a level of a single word. Finding the
next clear bit looks at the current word, then climbs the tree only as far as needed to reach the
next non-full word, so every operation costs O(log64 size): at most four levels for a /8 (2**24
bits), whatever the fill. The padding bits past `size` in the last word are kept set, so that
word reads as full when every real bit is set.

`RangeAllocator` is what one network's addresses need, in integers only: a bitmap of `size`
offsets, a dynamic range [lo, hi), `fixed` offsets (network, broadcast, gateway, reserved) set at
creation and never handed out nor released, a round-robin cursor and a count of the offsets used
inside [lo, hi). `allocate()` first compares that count with the range's capacity (a full range
answers -1 at once), then searches the first clear bit from the cursor; if it lies at or past
`hi`, the free offset must be in [lo, cursor), so one search from `lo` finds it. Both searches
are the O(log64 size) ones above, so an allocation stays cheap in a nearly full /8. The cursor
then moves just past the offset handed out, wrapping to `lo` at `hi`.

The Cython twin in `_fast/bitmap.pyx` keeps exactly this layout in C arrays and must give the
same result for every operation (tests/core/test_bitmap.py and tests/core/test_range_allocator.py
check them side by side).
"""

from __future__ import annotations

from collections.abc import Iterable

_FULL = (1 << 64) - 1

#: `RangeAllocator.claim` results.
CLAIMED = 1
IN_USE = 0
FIXED = -1


def _ctz(word: int) -> int:
    """Index of the lowest set bit of a non-zero word."""
    return (word & -word).bit_length() - 1


class Bitmap:
    """`size` bits, all clear at first, with O(log64 size) next-clear-bit search."""

    __slots__ = ("_count", "_levels", "_size", "_words")

    def __init__(self, size: int) -> None:
        """Create a bitmap of `size` clear bits.

        Raises:
            ValueError: `size` is less than 1.
        """
        size = int(size)
        if size < 1:
            raise ValueError(f"bitmap size must be at least 1, not {size}")
        self._size = size
        self._count = 0
        nwords = (size + 63) >> 6
        self._words = [0] * nwords
        tail = size & 63
        if tail:
            self._words[-1] = _FULL & ~((1 << tail) - 1)
        self._levels: list[list[int]] = []
        nbits = nwords
        while True:
            n = (nbits + 63) >> 6
            level = [_FULL] * n
            if nbits & 63:
                level[-1] = (1 << (nbits & 63)) - 1
            self._levels.append(level)
            if n == 1:
                break
            nbits = n

    @property
    def size(self) -> int:
        """Number of bits."""
        return self._size

    @property
    def count(self) -> int:
        """Number of set bits."""
        return self._count

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0 or i >= self._size:
            raise IndexError(f"bit {i} out of range [0, {self._size})")
        return i

    def test(self, i: int) -> bool:
        """Whether bit `i` is set. Raises IndexError outside [0, size)."""
        i = self._check(i)
        return bool((self._words[i >> 6] >> (i & 63)) & 1)

    def set(self, i: int) -> bool:
        """Set bit `i`; True if it was clear. Raises IndexError outside [0, size)."""
        i = self._check(i)
        w = i >> 6
        bit = 1 << (i & 63)
        old = self._words[w]
        if old & bit:
            return False
        new = old | bit
        self._words[w] = new
        self._count += 1
        if new == _FULL:
            # The word became full: clear its summary bit, and upwards while levels empty.
            for level in self._levels:
                j = w >> 6
                level[j] &= ~(1 << (w & 63))
                if level[j]:
                    break
                w = j
        return True

    def clear(self, i: int) -> bool:
        """Clear bit `i`; True if it was set. Raises IndexError outside [0, size)."""
        i = self._check(i)
        w = i >> 6
        bit = 1 << (i & 63)
        old = self._words[w]
        if not old & bit:
            return False
        self._words[w] = old & ~bit
        self._count -= 1
        if old == _FULL:
            # The word was full: set its summary bit, and upwards while levels were empty.
            for level in self._levels:
                j = w >> 6
                was = level[j]
                level[j] = was | (1 << (w & 63))
                if was:
                    break
                w = j
        return True

    def _next_nonzero(self, k: int, idx: int) -> int:
        """First set bit at index >= `idx` in summary level `k`, or -1."""
        level = self._levels[k]
        w = idx >> 6
        if w >= len(level):
            return -1
        m = level[w] & (_FULL << (idx & 63)) & _FULL
        if m:
            return (w << 6) + _ctz(m)
        if k + 1 == len(self._levels):
            return -1
        j = self._next_nonzero(k + 1, w + 1)
        if j < 0:
            return -1
        return (j << 6) + _ctz(level[j])

    def _find_from(self, start: int) -> int:
        """First clear bit at index >= `start`, or -1."""
        w = start >> 6
        m = ~self._words[w] & (_FULL << (start & 63)) & _FULL
        if m:
            return (w << 6) + _ctz(m)
        w = self._next_nonzero(0, w + 1)
        if w < 0:
            return -1
        return (w << 6) + _ctz(~self._words[w] & _FULL)

    def find_clear(self, start: int) -> int:
        """First clear bit at index >= `start`, wrapping around to [0, start); -1 if full.

        A `start` at or past the end wraps to 0 (a cursor just after the last bit).

        Raises:
            IndexError: `start` is negative.
        """
        start = int(start)
        if start < 0:
            raise IndexError(f"start {start} is negative")
        if self._count == self._size:
            return -1
        if start >= self._size:
            start = 0
        found = self._find_from(start)
        if found < 0 and start:
            found = self._find_from(0)
        return found

    def take(self, start: int, lo: int, hi: int) -> int:
        """Allocate in one call: the first clear bit in [start, hi), else in [lo, start), is
        set and returned; -1 if [lo, hi) is full. A `start` outside [lo, hi) means `lo`.

        Raises:
            IndexError: not 0 <= lo <= hi <= size.
        """
        start, lo, hi = int(start), int(lo), int(hi)
        if not 0 <= lo <= hi <= self._size:
            raise IndexError(f"range [{lo}, {hi}) outside [0, {self._size})")
        if lo == hi or self._count == self._size:
            return -1
        if not lo <= start < hi:
            start = lo
        found = self._find_from(start)
        if not 0 <= found < hi:
            found = self._find_from(lo) if start > lo else -1
            if found >= start:
                found = -1
        if found < 0:
            return -1
        self.set(found)
        return found

    def __repr__(self) -> str:
        return f"Bitmap(size={self._size}, count={self._count})"


class RangeAllocator:
    """Round-robin allocation of offsets in [lo, hi) out of `size`, around `fixed` offsets.

    Offsets are plain integers (an address's index in its subnet). Fixed offsets may lie inside
    or outside the range; they are set at creation and never handed out nor released. `claim`
    takes any other offset of [0, size) and does not move the cursor; `used` counts only the
    allocated offsets inside [lo, hi).
    """

    __slots__ = ("_bits", "_capacity", "_cursor", "_fixed", "_hi", "_lo", "_size", "_used")

    def __init__(self, size: int, lo: int, hi: int, fixed: Iterable[int] = ()) -> None:
        """Create the allocator with only the `fixed` offsets set; the cursor starts at `lo`.

        Raises:
            ValueError: `size` < 1, not 0 <= lo <= hi <= size, or a fixed offset outside
                [0, size).
        """
        size, lo, hi = int(size), int(lo), int(hi)
        if size < 1:
            raise ValueError(f"bitmap size must be at least 1, not {size}")
        if not 0 <= lo <= hi <= size:
            raise ValueError(f"range [{lo}, {hi}) outside [0, {size})")
        offsets = sorted({int(i) for i in fixed})
        for off in offsets:
            if not 0 <= off < size:
                raise ValueError(f"fixed offset {off} outside [0, {size})")
        self._bits = Bitmap(size)
        for off in offsets:
            self._bits.set(off)
        self._fixed = frozenset(offsets)
        self._size = size
        self._lo = lo
        self._hi = hi
        self._capacity = (hi - lo) - sum(lo <= off < hi for off in offsets)
        self._used = 0
        self._cursor = lo

    def allocate(self) -> int:
        """The next free offset of [lo, hi) from the cursor (wrapping), now allocated; the
        cursor moves just past it. -1 when the range is full."""
        if self._used == self._capacity:
            return -1
        bits = self._bits
        found = bits._find_from(self._cursor)
        if found < 0 or found >= self._hi:
            # nothing free in [cursor, hi): the range is not full, so [lo, cursor) has one
            found = bits._find_from(self._lo)
        bits.set(found)
        self._used += 1
        self._cursor = found + 1 if found + 1 < self._hi else self._lo
        return found

    def _check(self, i: int) -> None:
        if not 0 <= i < self._size:
            raise IndexError(f"offset {i} out of range [0, {self._size})")

    def claim(self, i: int) -> int:
        """Allocate offset `i` anywhere in [0, size) (a static request); the cursor stays.

        Returns CLAIMED (1), IN_USE (0) or FIXED (-1). Raises IndexError outside [0, size).
        """
        self._check(i)
        if not self._bits.set(i):
            return FIXED if i in self._fixed else IN_USE
        if self._lo <= i < self._hi:
            self._used += 1
        return CLAIMED

    def release(self, i: int) -> bool:
        """Free offset `i`; False if it is not allocated or is fixed.

        Raises IndexError outside [0, size).
        """
        self._check(i)
        if i in self._fixed or not self._bits.clear(i):
            return False
        if self._lo <= i < self._hi:
            self._used -= 1
        return True

    def is_allocated(self, i: int) -> bool:
        """Whether offset `i` is allocated (fixed offsets are not). IndexError outside."""
        self._check(i)
        return i not in self._fixed and self._bits.test(i)

    def is_fixed(self, i: int) -> bool:
        """Whether offset `i` is fixed. IndexError outside [0, size)."""
        self._check(i)
        return i in self._fixed

    @property
    def cursor(self) -> int:
        """Where the next allocation starts searching, in [lo, hi) (lo when empty)."""
        return self._cursor

    def set_cursor(self, value: int) -> None:
        """Restore a persisted cursor; `hi` (just past the end) wraps to `lo`.

        Raises:
            ValueError: `value` is outside [lo, hi].
        """
        if not self._lo <= value <= self._hi:
            raise ValueError(f"cursor {value} is outside the range [{self._lo}, {self._hi}]")
        self._cursor = self._lo if value == self._hi else value

    @property
    def size(self) -> int:
        """Number of offsets, fixed ones included."""
        return self._size

    @property
    def lo(self) -> int:
        """First offset of the dynamic range."""
        return self._lo

    @property
    def hi(self) -> int:
        """End (exclusive) of the dynamic range."""
        return self._hi

    @property
    def fixed(self) -> tuple[int, ...]:
        """The fixed offsets, sorted."""
        return tuple(sorted(self._fixed))

    @property
    def capacity(self) -> int:
        """Offsets of [lo, hi) that are not fixed."""
        return self._capacity

    @property
    def used(self) -> int:
        """Allocated offsets inside [lo, hi) (claims outside the range are not counted)."""
        return self._used

    @property
    def free(self) -> int:
        """Offsets of [lo, hi) still available."""
        return self._capacity - self._used

    def __repr__(self) -> str:
        return (
            f"RangeAllocator(size={self._size}, lo={self._lo}, hi={self._hi}, "
            f"used={self._used}, free={self._capacity - self._used})"
        )
