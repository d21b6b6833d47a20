# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, binding=False
# binding=False: methods are plain C method descriptors, not Cython function objects, so a
# call skips the bound-method layer (a release went from 23 to 15 ns; see bench_ipam).
"""iptables-restore text from a transaction: Cython twin of
`agent/firewall/iptables/serialize.py`.

Same input, same bytes out (tests/core/test_serialize.py checks it with hypothesis).

Speed: the usual script is all ASCII and needs no quoting. A first pass checks every token
against a 128-entry table and sums the lengths; a second pass copies the tokens with memcpy into
ONE preallocated string (`PyUnicode_New`), so no per-line string or list is ever built. Any
other script (quoting, non-ASCII, odd input types) takes the general path: typed per-character
scans and one list of lines joined at the end.
"""

from libc.string cimport memcpy


cdef extern from "Python.h":
    ctypedef unsigned char Py_UCS1
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    Py_UCS1* PyUnicode_1BYTE_DATA(object o)
    bint PyUnicode_IS_ASCII(object o)

# Character classes, kept identical to the pure twin:
#   needs quotes: empty, ' ', '\t', '\x0b', '\x0c', '"', "'", '\\'
#   forbidden:    '\n', '\r', '\x00'
cdef enum:
    PLAIN = 0
    QUOTE = 1
    FORBID = 2

# ASCII characters that keep a token off the fast path (need quotes, or are forbidden).
cdef unsigned char _SPECIAL[128]
for _c in range(128):
    _SPECIAL[_c] = chr(_c) in " \t\x0b\x0c\"'\\\n\r\x00"


cdef inline int _classify(str token):
    """PLAIN, QUOTE or FORBID for one token (FORBID wins over QUOTE)."""
    cdef Py_UCS4 c
    cdef int kind = PLAIN
    if len(token) == 0:
        return QUOTE
    for c in token:
        if c > 0x27 and c != 0x5C:
            continue
        if c == 0x0A or c == 0x0D or c == 0x00:
            return FORBID
        if c == 0x20 or c == 0x09 or c == 0x0B or c == 0x0C or c == 0x22 or c == 0x27 or c == 0x5C:
            kind = QUOTE
    return kind


cdef str _quote(str token):
    cdef int kind = _classify(token)
    if kind == PLAIN:
        return token
    if kind == FORBID:
        raise ValueError(f"token cannot be written to iptables-restore: {token!r}")
    escaped = token.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'


cdef str _name(str name):
    if _classify(name) != PLAIN:
        raise ValueError(f"invalid table or chain name: {name!r}")
    return name


cdef str _line(str op, str chain, object args):
    cdef tuple targs = tuple(args)
    cdef Py_ssize_t i, n = len(targs)
    cdef list parts
    cdef str token
    cdef bint plain = _classify(op) == PLAIN and _classify(chain) == PLAIN
    if plain:
        for i in range(n):
            token = <str?>targs[i]
            if _classify(token) != PLAIN:
                plain = False
                break
    if plain:
        if n == 0:
            return op + " " + chain
        return op + " " + chain + " " + " ".join(targs)
    parts = [None] * (n + 2)
    parts[0] = _quote(op)
    parts[1] = _name(chain)
    for i in range(n):
        parts[i + 2] = _quote(<str?>targs[i])
    return " ".join(parts)


def format_op(str op, str chain, args):
    """One rule line, e.g. `-A NETAGENT-FORWARD -o br-x -j NETAGENT-N-x`."""
    return _line(op, chain, args)


def quote(str token):
    """`token` as iptables-restore must read it back: bare when safe, else double-quoted."""
    return _quote(token)


cdef inline Py_ssize_t _plain_ascii(object token):
    """Length of a str token that is ASCII and needs no quotes, else -1."""
    cdef Py_ssize_t i, n
    cdef const Py_UCS1* data
    if type(token) is not str or not PyUnicode_IS_ASCII(token):
        return -1
    n = len(<str>token)
    if n == 0:
        return -1
    data = PyUnicode_1BYTE_DATA(token)
    for i in range(n):
        if _SPECIAL[data[i]]:
            return -1
    return n


cdef inline Py_ssize_t _put(Py_UCS1* buf, Py_ssize_t pos, object token):
    cdef Py_ssize_t n = len(<str>token)
    memcpy(buf + pos, PyUnicode_1BYTE_DATA(token), n)
    return pos + n


cdef object _serialize_ascii(object tables):
    """The whole text in one preallocated string, or None when the general path is needed."""
    cdef Py_ssize_t total = 0, n, pos = 0
    cdef Py_UCS1* buf
    cdef object section, table, declares, ops, op, chain, args, token
    for section in tables:
        if not isinstance(section, tuple) or len(<tuple>section) != 3:
            return None
        table, declares, ops = section
        if not isinstance(declares, (tuple, list)) or not isinstance(ops, (tuple, list)):
            return None
        n = _plain_ascii(table)
        if n < 0:
            return None
        total += n + 9  # "*table\n" + "COMMIT\n"
        for chain in declares:
            n = _plain_ascii(chain)
            if n < 0:
                return None
            total += n + 10  # ":chain - [0:0]\n"
        for op in ops:
            if not isinstance(op, tuple) or len(<tuple>op) != 3:
                return None
            args = (<tuple>op)[2]
            if not isinstance(args, tuple):
                return None
            n = _plain_ascii((<tuple>op)[0])
            if n < 0:
                return None
            total += n + 1  # the token and the space or newline after it
            n = _plain_ascii((<tuple>op)[1])
            if n < 0:
                return None
            total += n + 1
            for token in <tuple>args:
                n = _plain_ascii(token)
                if n < 0:
                    return None
                total += n + 1
    out = PyUnicode_New(total, 127)
    buf = PyUnicode_1BYTE_DATA(out)
    for table, declares, ops in tables:
        buf[pos] = 0x2A  # "*"
        pos = _put(buf, pos + 1, table)
        buf[pos] = 0x0A
        pos += 1
        for chain in declares:
            buf[pos] = 0x3A  # ":"
            pos = _put(buf, pos + 1, chain)
            memcpy(buf + pos, b" - [0:0]\n", 9)
            pos += 9
        for op, chain, args in ops:
            pos = _put(buf, pos, op)
            buf[pos] = 0x20
            pos = _put(buf, pos + 1, chain)
            for token in <tuple>args:
                buf[pos] = 0x20
                pos = _put(buf, pos + 1, token)
            buf[pos] = 0x0A
            pos += 1
        memcpy(buf + pos, b"COMMIT\n", 7)
        pos += 7
    assert pos == total
    return out


def serialize(script):
    """The iptables-restore text of `script` (a `rules.Script` or its `tables` structure)."""
    tables = getattr(script, "tables", script)
    if not isinstance(tables, (tuple, list)):
        tables = list(tables)
    fast = _serialize_ascii(tables)
    if fast is not None:
        return fast
    cdef list lines = []
    cdef object op, chain, args
    for table, declares, ops in tables:
        lines.append("*" + _name(table))
        for chain in declares:
            lines.append(":" + _name(chain) + " - [0:0]")
        for op, chain, args in ops:
            lines.append(_line(op, chain, args))
        lines.append("COMMIT")
    lines.append("")
    return "\n".join(lines)
