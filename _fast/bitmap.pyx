# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, binding=False
# binding=False: methods are plain C method descriptors, not Cython function objects, so a
# call skips the bound-method layer (a release went from 23 to 15 ns; see bench_ipam).
"""Cython twin of `agent.core.bitmap`: a bitmap with O(log64 size) next-clear-bit search, and
the per-network range allocator built on it.

Same layout as the pure twin (read its module docstring): 64-bit words, `1` = set, padding bits
past `size` kept set, and a 64-ary summary tree whose level 0 marks the words that still have a
clear bit. The tree levels are stored back to back in one C array; `off[k]`/`len[k]` locate
level `k`. The arrays and their counters live in a C struct (`bits_t`) worked on by nogil
functions, shared by `Bitmap` and `RangeAllocator`: the allocator embeds its own `bits_t`, so an
allocation (fast "full" test, search from the cursor, set, counters, cursor wrap) runs entirely
in C without touching a Python object; only the argument and the result cross into Python.
Results are identical to the pure twin for every operation, except that an index beyond a C
`Py_ssize_t` (|i| >= 2**63) raises OverflowError while converting the argument.
"""

cimport cython
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free, malloc

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil

cdef enum:
    MAX_LEVELS = 12

cdef enum:  # claim results as C constants (no module-global lookup on the hot path)
    C_CLAIMED = 1
    C_IN_USE = 0
    C_FIXED = -1

cdef uint64_t FULL = 0xFFFFFFFFFFFFFFFF

#: `RangeAllocator.claim` results (same values as in the pure twin).
CLAIMED = 1
IN_USE = 0
FIXED = -1


ctypedef struct bits_t:
    uint64_t *words
    uint64_t *tree
    Py_ssize_t size
    Py_ssize_t count
    Py_ssize_t nwords
    int nlevels
    Py_ssize_t off[MAX_LEVELS]
    Py_ssize_t len[MAX_LEVELS]


cdef inline uint64_t _mask_from(Py_ssize_t i) noexcept nogil:
    """All bits at positions >= i & 63 of a word."""
    return FULL << (i & 63)


cdef int _bits_init(bits_t *b, Py_ssize_t size) noexcept nogil:
    """Lay out `size` clear bits (size >= 1); -1 when out of memory."""
    cdef Py_ssize_t n, nbits, total = 0
    cdef int k
    b.size = size
    b.count = 0
    b.nwords = (size + 63) >> 6
    b.nlevels = 0
    nbits = b.nwords
    while True:
        n = (nbits + 63) >> 6
        b.off[b.nlevels] = total
        b.len[b.nlevels] = n
        total += n
        b.nlevels += 1
        if n == 1:
            break
        nbits = n
    b.words = <uint64_t *> calloc(b.nwords, sizeof(uint64_t))
    b.tree = <uint64_t *> calloc(total, sizeof(uint64_t))
    if b.words == NULL or b.tree == NULL:
        return -1
    if size & 63:
        b.words[b.nwords - 1] = FULL << (size & 63)
    nbits = b.nwords
    for k in range(b.nlevels):
        for n in range(b.len[k]):
            b.tree[b.off[k] + n] = FULL
        if nbits & 63:
            b.tree[b.off[k] + b.len[k] - 1] = ((<uint64_t> 1) << (nbits & 63)) - 1
        nbits = b.len[k]
    return 0


cdef void _bits_free(bits_t *b) noexcept nogil:
    free(b.words)
    free(b.tree)
    b.words = NULL
    b.tree = NULL


cdef inline bint _bits_test(const bits_t *b, Py_ssize_t j) noexcept nogil:
    """Whether bit `j` (in range) is set."""
    return (b.words[j >> 6] >> (j & 63)) & 1


cdef inline void _bits_set_clear_bit(bits_t *b, Py_ssize_t j) noexcept nogil:
    """Set bit `j`, known to be clear, and keep the summary tree true."""
    cdef Py_ssize_t w = j >> 6, p
    cdef uint64_t new = b.words[w] | ((<uint64_t> 1) << (j & 63))
    cdef int k
    b.words[w] = new
    b.count += 1
    if new == FULL:
        for k in range(b.nlevels):
            p = b.off[k] + (w >> 6)
            b.tree[p] &= ~((<uint64_t> 1) << (w & 63))
            if b.tree[p]:
                break
            w >>= 6


cdef inline void _bits_clear_set_bit(bits_t *b, Py_ssize_t j) noexcept nogil:
    """Clear bit `j`, known to be set, and keep the summary tree true."""
    cdef Py_ssize_t w = j >> 6, p
    cdef uint64_t old = b.words[w], was
    cdef int k
    b.words[w] = old & ~((<uint64_t> 1) << (j & 63))
    b.count -= 1
    if old == FULL:
        for k in range(b.nlevels):
            p = b.off[k] + (w >> 6)
            was = b.tree[p]
            b.tree[p] = was | ((<uint64_t> 1) << (w & 63))
            if was:
                break
            w >>= 6


cdef Py_ssize_t _next_nonzero(const bits_t *b, int k, Py_ssize_t idx) noexcept nogil:
    """First set bit at index >= idx in summary level k, or -1."""
    cdef Py_ssize_t w = idx >> 6, j
    cdef uint64_t m
    if w >= b.len[k]:
        return -1
    m = b.tree[b.off[k] + w] & _mask_from(idx)
    if m:
        return (w << 6) + __builtin_ctzll(m)
    if k + 1 == b.nlevels:
        return -1
    j = _next_nonzero(b, k + 1, w + 1)
    if j < 0:
        return -1
    return (j << 6) + __builtin_ctzll(b.tree[b.off[k] + j])


cdef inline Py_ssize_t _find_from(const bits_t *b, Py_ssize_t start) noexcept nogil:
    """First clear bit at index >= start (0 <= start < size), or -1."""
    cdef Py_ssize_t w = start >> 6
    cdef uint64_t m = ~b.words[w] & _mask_from(start)
    if m:
        return (w << 6) + __builtin_ctzll(m)
    w = _next_nonzero(b, 0, w + 1)
    if w < 0:
        return -1
    return (w << 6) + __builtin_ctzll(~b.words[w])


cdef class Bitmap:
    """`size` bits, all clear at first, with O(log64 size) next-clear-bit search."""

    cdef bits_t _b

    def __cinit__(self, size):
        size = int(size)
        if size < 1:
            raise ValueError(f"bitmap size must be at least 1, not {size}")
        if _bits_init(&self._b, size) < 0:
            raise MemoryError()

    def __dealloc__(self):
        _bits_free(&self._b)

    @property
    def size(self):
        """Number of bits."""
        return self._b.size

    @property
    def count(self):
        """Number of set bits."""
        return self._b.count

    cdef Py_ssize_t _check(self, object i) except -1:
        cdef Py_ssize_t j
        i = int(i)
        if i < 0 or i >= self._b.size:
            raise IndexError(f"bit {i} out of range [0, {self._b.size})")
        j = i
        return j

    def test(self, i):
        """Whether bit `i` is set. Raises IndexError outside [0, size)."""
        return _bits_test(&self._b, self._check(i))

    def set(self, i):
        """Set bit `i`; True if it was clear. Raises IndexError outside [0, size)."""
        cdef Py_ssize_t j = self._check(i)
        if _bits_test(&self._b, j):
            return False
        _bits_set_clear_bit(&self._b, j)
        return True

    def clear(self, i):
        """Clear bit `i`; True if it was set. Raises IndexError outside [0, size)."""
        cdef Py_ssize_t j = self._check(i)
        if not _bits_test(&self._b, j):
            return False
        _bits_clear_set_bit(&self._b, j)
        return True

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
        if self._b.count == self._b.size:
            return -1
        s = 0 if start >= self._b.size else start
        found = _find_from(&self._b, s)
        if found < 0 and s:
            found = _find_from(&self._b, 0)
        return found

    def take(self, Py_ssize_t start, Py_ssize_t lo, Py_ssize_t hi):
        """Allocate in one call: the first clear bit in [start, hi), else in [lo, start), is
        set and returned; -1 if [lo, hi) is full. A `start` outside [lo, hi) means `lo`.

        Raises:
            IndexError: not 0 <= lo <= hi <= size.
        """
        cdef Py_ssize_t s = start, found
        if not 0 <= lo <= hi <= self._b.size:
            raise IndexError(f"range [{lo}, {hi}) outside [0, {self._b.size})")
        if lo == hi or self._b.count == self._b.size:
            return -1
        if not lo <= s < hi:
            s = lo
        found = _find_from(&self._b, s)
        if not 0 <= found < hi:
            found = _find_from(&self._b, lo) if s > lo else -1
            if found >= s:
                found = -1
        if found < 0:
            return -1
        _bits_set_clear_bit(&self._b, found)
        return found

    def __repr__(self):
        return f"Bitmap(size={self._b.size}, count={self._b.count})"


@cython.final
cdef class RangeAllocator:
    """Round-robin allocation of offsets in [lo, hi) out of `size`, around `fixed` offsets.

    The offsets in `fixed` are set at creation and never handed out nor released. Read the
    pure twin (`agent.core.bitmap.RangeAllocator`) for the full contract.
    """

    cdef bits_t _b
    cdef Py_ssize_t _lo
    cdef Py_ssize_t _hi
    cdef Py_ssize_t _cursor
    cdef Py_ssize_t _used
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t *_fixed  # sorted, distinct
    cdef Py_ssize_t _nfixed

    def __cinit__(self, size, lo, hi, fixed=()):
        cdef Py_ssize_t k, i
        size, lo, hi = int(size), int(lo), int(hi)
        if size < 1:
            raise ValueError(f"bitmap size must be at least 1, not {size}")
        if not 0 <= lo <= hi <= size:
            raise ValueError(f"range [{lo}, {hi}) outside [0, {size})")
        offsets = sorted({int(i) for i in fixed})
        for off in offsets:
            if not 0 <= off < size:
                raise ValueError(f"fixed offset {off} outside [0, {size})")
        if _bits_init(&self._b, size) < 0:
            raise MemoryError()
        self._nfixed = len(offsets)
        self._fixed = <Py_ssize_t *> malloc((self._nfixed or 1) * sizeof(Py_ssize_t))
        if self._fixed == NULL:
            raise MemoryError()
        self._lo = lo
        self._hi = hi
        self._capacity = hi - lo
        for k in range(self._nfixed):
            i = offsets[k]
            self._fixed[k] = i
            _bits_set_clear_bit(&self._b, i)
            if lo <= i < hi:
                self._capacity -= 1
        self._used = 0
        self._cursor = lo

    def __dealloc__(self):
        _bits_free(&self._b)
        free(self._fixed)

    cdef inline bint _is_fixed(self, Py_ssize_t i) noexcept nogil:
        """Binary search of `i` in the sorted fixed offsets."""
        cdef Py_ssize_t a = 0, z = self._nfixed, m
        while a < z:
            m = (a + z) >> 1
            if self._fixed[m] < i:
                a = m + 1
            else:
                z = m
        return a < self._nfixed and self._fixed[a] == i

    cdef inline Py_ssize_t _allocate(self) noexcept nogil:
        cdef Py_ssize_t found
        if self._used == self._capacity:
            return -1
        found = _find_from(&self._b, self._cursor)
        if found < 0 or found >= self._hi:
            # nothing free in [cursor, hi): the range is not full, so [lo, cursor) has one
            found = _find_from(&self._b, self._lo)
        _bits_set_clear_bit(&self._b, found)
        self._used += 1
        self._cursor = found + 1 if found + 1 < self._hi else self._lo
        return found

    cdef int _check(self, Py_ssize_t i) except -1:
        if <size_t> i >= <size_t> self._b.size:  # one unsigned compare covers i < 0
            raise IndexError(f"offset {i} out of range [0, {self._b.size})")
        return 0

    @cython.always_allow_keywords(False)
    def allocate(self):
        """The next free offset of [lo, hi) from the cursor (wrapping), now allocated; the
        cursor moves just past it. -1 when the range is full."""
        return self._allocate()

    @cython.always_allow_keywords(False)
    def claim(self, Py_ssize_t i):
        """Allocate offset `i` anywhere in [0, size) (a static request); the cursor stays.

        Returns CLAIMED (1), IN_USE (0) or FIXED (-1). Raises IndexError outside [0, size).
        """
        self._check(i)
        if _bits_test(&self._b, i):
            return C_FIXED if self._is_fixed(i) else C_IN_USE
        _bits_set_clear_bit(&self._b, i)
        if self._lo <= i < self._hi:
            self._used += 1
        return C_CLAIMED

    @cython.always_allow_keywords(False)
    def release(self, Py_ssize_t i):
        """Free offset `i`; False if it is not allocated or is fixed.

        Raises IndexError outside [0, size).
        """
        self._check(i)
        if not _bits_test(&self._b, i) or self._is_fixed(i):
            return False
        _bits_clear_set_bit(&self._b, i)
        if self._lo <= i < self._hi:
            self._used -= 1
        return True

    @cython.always_allow_keywords(False)
    def is_allocated(self, Py_ssize_t i):
        """Whether offset `i` is allocated (fixed offsets are not). IndexError outside."""
        self._check(i)
        return _bits_test(&self._b, i) and not self._is_fixed(i)

    @cython.always_allow_keywords(False)
    def is_fixed(self, Py_ssize_t i):
        """Whether offset `i` is fixed. IndexError outside [0, size)."""
        self._check(i)
        return self._is_fixed(i)

    @property
    def cursor(self):
        """Where the next allocation starts searching, in [lo, hi) (lo when empty)."""
        return self._cursor

    def set_cursor(self, value):
        """Restore a persisted cursor; `hi` (just past the end) wraps to `lo`.

        Raises:
            ValueError: `value` is outside [lo, hi].
        """
        if not self._lo <= value <= self._hi:
            raise ValueError(f"cursor {value} is outside the range [{self._lo}, {self._hi}]")
        self._cursor = self._lo if value == self._hi else value

    @property
    def size(self):
        """Number of offsets, fixed ones included."""
        return self._b.size

    @property
    def lo(self):
        """First offset of the dynamic range."""
        return self._lo

    @property
    def hi(self):
        """End (exclusive) of the dynamic range."""
        return self._hi

    @property
    def fixed(self):
        """The fixed offsets, sorted."""
        return tuple(self._fixed[k] for k in range(self._nfixed))

    @property
    def capacity(self):
        """Offsets of [lo, hi) that are not fixed."""
        return self._capacity

    @property
    def used(self):
        """Allocated offsets inside [lo, hi) (claims outside the range are not counted)."""
        return self._used

    @property
    def free(self):
        """Offsets of [lo, hi) still available."""
        return self._capacity - self._used

    def __repr__(self):
        return (
            f"RangeAllocator(size={self._b.size}, lo={self._lo}, hi={self._hi}, "
            f"used={self._used}, free={self._capacity - self._used})"
        )
