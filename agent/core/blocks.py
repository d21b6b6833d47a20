"""Taken address space kept incrementally: a multiset of CIDR blocks as merged runs (pure).

Theory of operation. Subnet choice (`agent.core.pools.choose_subnet`) asks one question of the
address space already taken: "does [lo, hi] overlap anything, and where does that end?". Built
from scratch (`pools.Intervals`) the answer costs a sort of every network and route per create.
A `BlockSet` keeps the same merged runs (sorted, disjoint, adjacent ones joined, exactly what
`Intervals` builds) up to date as blocks come and go, in O(log n) per change:

- every block is a CIDR block (aligned, a power of two long), so two blocks are either nested
  or disjoint; blocks are counted (a network's subnet and its bridge's connected route are the
  same block twice);
- adding a block joins it with the runs it overlaps or touches;
- removing the last copy of a block that another block contains changes nothing; removing a
  maximal block cuts its run in two around it and puts back the runs of the blocks nested in
  it (usually none), joined with the two pieces where they touch.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable

from agent.core.pools import IPNetwork, Taken


def span(net: IPNetwork) -> tuple[int, int]:
    """(first, last) address of `net` as integers."""
    return int(net.network_address), int(net.broadcast_address)


class BlockSet:
    """Counted CIDR blocks of one IP version, as merged runs (`starts`, `ends`)."""

    def __init__(self, blocks: Iterable[tuple[int, int]] = ()) -> None:
        self.counts: dict[tuple[int, int], int] = {}
        self.blocks: list[tuple[int, int]] = []  # distinct blocks, sorted
        self.sizes: dict[int, int] = {}  # block length -> how many distinct blocks have it
        self.starts: list[int] = []
        self.ends: list[int] = []
        for lo, hi in blocks:
            self.add(lo, hi)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def add(self, lo: int, hi: int) -> None:
        """One more copy of the CIDR block [lo, hi]."""
        key = (lo, hi)
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        if n:
            return
        insort(self.blocks, key)
        size = hi - lo + 1
        self.sizes[size] = self.sizes.get(size, 0) + 1
        i = bisect_left(self.ends, lo - 1)  # first run ending at or after lo - 1 (touching)
        j = bisect_right(self.starts, hi + 1)  # runs before j start at or before hi + 1
        if i < j:
            lo, hi = min(lo, self.starts[i]), max(hi, self.ends[j - 1])
        self.starts[i:j] = [lo]
        self.ends[i:j] = [hi]

    def remove(self, lo: int, hi: int) -> None:
        """One copy of [lo, hi] fewer.

        Raises:
            KeyError: the block is not in the set.
        """
        key = (lo, hi)
        n = self.counts[key]
        if n > 1:
            self.counts[key] = n - 1
            return
        del self.counts[key]
        del self.blocks[bisect_left(self.blocks, key)]
        size = hi - lo + 1
        self.sizes[size] -= 1
        if not self.sizes[size]:
            del self.sizes[size]
        if self._contained(lo, size):
            return
        r = bisect_right(self.starts, lo) - 1
        a, b = self.starts[r], self.ends[r]
        pieces = [(a, lo - 1)] if a < lo else []
        k = bisect_left(self.blocks, (lo, lo))
        while k < len(self.blocks) and self.blocks[k][0] <= hi:
            pieces.append(self.blocks[k])
            k += 1
        if hi < b:
            pieces.append((hi + 1, b))
        starts: list[int] = []
        ends: list[int] = []
        for s, e in pieces:  # sorted by start: the inner blocks lie between the two pieces
            if ends and s <= ends[-1] + 1:
                ends[-1] = max(ends[-1], e)
            else:
                starts.append(s)
                ends.append(e)
        self.starts[r : r + 1] = starts
        self.ends[r : r + 1] = ends

    def _contained(self, lo: int, size: int) -> bool:
        """Whether a larger block of the set contains the block of `size` starting at `lo`."""
        for other in self.sizes:
            if other > size:
                start = lo - lo % other
                if (start, start + other - 1) in self.counts:
                    return True
        return False

    def overlap_end(self, lo: int, hi: int) -> int | None:
        """End of the run overlapping [lo, hi], or None when nothing overlaps."""
        i = bisect_right(self.starts, hi) - 1
        if i >= 0 and self.ends[i] >= lo:
            return self.ends[i]
        return None


class Either:
    """The union of several `Taken` (a network's subnets and the host's routes)."""

    def __init__(self, *parts: Taken) -> None:
        self.parts = parts

    def overlap_end(self, lo: int, hi: int) -> int | None:
        """The furthest end of an overlapping run of any part (all of it is taken), or None."""
        ends = [e for p in self.parts if (e := p.overlap_end(lo, hi)) is not None]
        return max(ends) if ends else None
