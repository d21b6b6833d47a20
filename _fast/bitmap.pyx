# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython twin of `agent.core.bitmap`: a bitmap with O(log64 size) next-clear-bit search.

Same layout as the pure twin (read its module docstring): 64-bit words, `1` = set, padding bits
past `size` kept set, and a 64-ary summary tree whose level 0 marks the words that still have a
clear bit. The tree levels are stored back to back in one C array; `_off[k]`/`_len[k]` locate
level `k`. Results are identical to the pure twin for every operation.
"""

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil

cdef enum:
    MAX_LEVELS = 12

cdef uint64_t FULL = 0xFFFFFFFFFFFFFFFF


cdef inline uint64_t _mask_from(Py_ssize_t i) nogil:
    """All bits at positions >= i & 63 of a word."""
    return FULL << (i & 63)


cdef class Bitmap:
    """`size` bits, all clear at first, with O(log64 size) next-clear-bit search."""

    cdef uint64_t *_words
    cdef uint64_t *_tree
    cdef Py_ssize_t _size
    cdef Py_ssize_t _count
    cdef Py_ssize_t _nwords
    cdef int _nlevels
    cdef Py_ssize_t _off[MAX_LEVELS]
    cdef Py_ssize_t _len[MAX_LEVELS]

    def __cinit__(self, size):
        cdef Py_ssize_t n, nbits, total = 0
        cdef int k
        size = int(size)
        if size < 1:
            raise ValueError(f"bitmap size must be at least 1, not {size}")
        self._size = size
        self._count = 0
        self._nwords = (self._size + 63) >> 6
        self._nlevels = 0
        nbits = self._nwords
        while True:
            n = (nbits + 63) >> 6
            self._off[self._nlevels] = total
            self._len[self._nlevels] = n
            total += n
            self._nlevels += 1
            if n == 1:
                break
            nbits = n
        self._words = <uint64_t *> calloc(self._nwords, sizeof(uint64_t))
        self._tree = <uint64_t *> calloc(total, sizeof(uint64_t))
        if self._words == NULL or self._tree == NULL:
            raise MemoryError()
        if self._size & 63:
            self._words[self._nwords - 1] = FULL << (self._size & 63)
        nbits = self._nwords
        for k in range(self._nlevels):
            for n in range(self._len[k]):
                self._tree[self._off[k] + n] = FULL
            if nbits & 63:
                self._tree[self._off[k] + self._len[k] - 1] = ((<uint64_t> 1) << (nbits & 63)) - 1
            nbits = self._len[k]

    def __dealloc__(self):
        free(self._words)
        free(self._tree)

    @property
    def size(self):
        """Number of bits."""
        return self._size

    @property
    def count(self):
        """Number of set bits."""
        return self._count

    cdef Py_ssize_t _check(self, object i) except -1:
        cdef Py_ssize_t j
        i = int(i)
        if i < 0 or i >= self._size:
            raise IndexError(f"bit {i} out of range [0, {self._size})")
        j = i
        return j

    def test(self, i):
        """Whether bit `i` is set. Raises IndexError outside [0, size)."""
        cdef Py_ssize_t j = self._check(i)
        return bool((self._words[j >> 6] >> (j & 63)) & 1)

    def set(self, i):
        """Set bit `i`; True if it was clear. Raises IndexError outside [0, size)."""
        cdef Py_ssize_t j = self._check(i)
        if (self._words[j >> 6] >> (j & 63)) & 1:
            return False
        self._set_clear_bit(j)
        return True

    cdef void _set_clear_bit(self, Py_ssize_t j) noexcept nogil:
        """Set bit `j`, known to be clear, and keep the summary tree true."""
        cdef Py_ssize_t w = j >> 6, p
        cdef uint64_t bit = (<uint64_t> 1) << (j & 63)
        cdef uint64_t new
        cdef int k
        new = self._words[w] | bit
        self._words[w] = new
        self._count += 1
        if new == FULL:
            for k in range(self._nlevels):
                p = self._off[k] + (w >> 6)
                self._tree[p] &= ~((<uint64_t> 1) << (w & 63))
                if self._tree[p]:
                    break
                w >>= 6

    def clear(self, i):
        """Clear bit `i`; True if it was set. Raises IndexError outside [0, size)."""
        cdef Py_ssize_t j = self._check(i)
        cdef Py_ssize_t w = j >> 6, p
        cdef uint64_t bit = (<uint64_t> 1) << (j & 63)
        cdef uint64_t old = self._words[w], was
        cdef int k
        if not (old & bit):
            return False
        self._words[w] = old & ~bit
        self._count -= 1
        if old == FULL:
            for k in range(self._nlevels):
                p = self._off[k] + (w >> 6)
                was = self._tree[p]
                self._tree[p] = was | ((<uint64_t> 1) << (w & 63))
                if was:
                    break
                w >>= 6
        return True

    cdef Py_ssize_t _next_nonzero(self, int k, Py_ssize_t idx) noexcept nogil:
        """First set bit at index >= idx in summary level k, or -1."""
        cdef Py_ssize_t w = idx >> 6, j
        cdef uint64_t m
        if w >= self._len[k]:
            return -1
        m = self._tree[self._off[k] + w] & _mask_from(idx)
        if m:
            return (w << 6) + __builtin_ctzll(m)
        if k + 1 == self._nlevels:
            return -1
        j = self._next_nonzero(k + 1, w + 1)
        if j < 0:
            return -1
        return (j << 6) + __builtin_ctzll(self._tree[self._off[k] + j])

    cdef Py_ssize_t _find_from(self, Py_ssize_t start) noexcept nogil:
        """First clear bit at index >= start, or -1."""
        cdef Py_ssize_t w = start >> 6
        cdef uint64_t m = ~self._words[w] & _mask_from(start)
        if m:
            return (w << 6) + __builtin_ctzll(m)
        w = self._next_nonzero(0, w + 1)
        if w < 0:
            return -1
        return (w << 6) + __builtin_ctzll(~self._words[w])

    def find_clear(self, start):
        """First clear bit at index >= `start`, wrapping around to [0, start); -1 if full.

        A `start` at or past the end wraps to 0 (a cursor just after the last bit).

        Raises:
            IndexError: `start` is negative.
        """
        cdef Py_ssize_t s, found
        start = int(start)
        if start < 0:
            raise IndexError(f"start {start} is negative")
        if self._count == self._size:
            return -1
        s = 0 if start >= self._size else start
        found = self._find_from(s)
        if found < 0 and s:
            found = self._find_from(0)
        return found

    def take(self, Py_ssize_t start, Py_ssize_t lo, Py_ssize_t hi):
        """Allocate in one call: the first clear bit in [start, hi), else in [lo, start), is
        set and returned; -1 if [lo, hi) is full. A `start` outside [lo, hi) means `lo`.

        Raises:
            IndexError: not 0 <= lo <= hi <= size.
        """
        cdef Py_ssize_t s = start, l = lo, h = hi, found
        if not 0 <= l <= h <= self._size:
            raise IndexError(f"range [{l}, {h}) outside [0, {self._size})")
        if l == h or self._count == self._size:
            return -1
        if not l <= s < h:
            s = l
        found = self._find_from(s)
        if not 0 <= found < h:
            found = self._find_from(l) if s > l else -1
            if found >= s:
                found = -1
        if found < 0:
            return -1
        self._set_clear_bit(found)
        return found

    def __repr__(self):
        return f"Bitmap(size={self._size}, count={self._count})"
