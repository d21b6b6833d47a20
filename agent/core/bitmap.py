"""A fixed-size bitmap that finds the next clear bit fast: the pure-Python twin of `_fast.bitmap`.

Theory of operation: the bits live in 64-bit words (`1` = set). Above them sits a summary tree
of 64-ary levels: bit `w` of level 0 is `1` when word `w` still has a clear bit, bit `j` of level
`k + 1` is `1` when word `j` of level `k` is non-zero, up to a level of a single word. Finding the
next clear bit looks at the current word, then climbs the tree only as far as needed to reach the
next non-full word, so every operation costs O(log64 size): at most four levels for a /8 (2**24
bits), whatever the fill. The padding bits past `size` in the last word are kept set, so that
word reads as full when every real bit is set.

The Cython twin in `_fast/bitmap.pyx` keeps exactly this layout in C arrays and must give the
same result for every operation (tests/core/test_bitmap.py checks them side by side).
"""

from __future__ import annotations

_FULL = (1 << 64) - 1


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
