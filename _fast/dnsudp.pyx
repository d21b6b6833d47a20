# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, binding=False
"""The DNS server's UDP hot path: Cython twin of `agent/dns/udpbatch.py`.

Same socket, same cache, same replies, drops, turns and misses (tests/core/test_dns_udpbatch.py
checks it on real sockets with hypothesis-made datagrams and caches); read the pure twin's
docstring for the rules.

Speed (why it exists: docs/ARCHITECTURE.md, "Names (DNS)"): one `recvmmsg` (non-blocking, GIL
held: see `_serve`) reads up to `size` datagrams into buffers allocated once and shared by
every Batch; the source check is an integer
compare on the raw address; a hit's reply is two iovecs (the query's id in the receive buffer,
the cached octets in place) and all replies of the call go out in one `sendmmsg` (GIL
released). Only misses
become Python objects (the datagram and a source tuple as `socket.recvfrom` makes it).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import os
import socket

from agent.dns.udpbatch import HEADER, MAX_QUERY, SIZE

__all__ = ["Batch"]


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct iovec:
        void* iov_base
        size_t iov_len
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct timespec:
        pass
    int recvmmsg(int fd, mmsghdr* msgs, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int fd, mmsghdr* msgs, unsigned int vlen, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC
    int AF_INET
    int AF_INET6

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint32_t ntohl(uint32_t)
    unsigned short ntohs(unsigned short)

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)

cdef enum:
    ADDRSTRLEN = 64


# The buffers, shared by every Batch (there is one per network and gateway: 1,000 networks
# must not cost 1,000 sets of 64 x 4 KiB): `serve` uses them only from its start to its return
# (misses are copied out, replies sent) and one call at a time (`_busy`: a second thread
# entering while the first has the GIL released is refused).
cdef Py_ssize_t BUFLEN = MAX_QUERY + 1
cdef int _capacity = 0
cdef bint _busy = False
cdef char* bufs = NULL
cdef sockaddr_storage* names = NULL
cdef iovec* in_iov = NULL
cdef mmsghdr* in_msgs = NULL
cdef iovec* out_iov = NULL
cdef mmsghdr* out_msgs = NULL
cdef PyObject** held = NULL


cdef int _reserve(int size) except -1:
    """Buffers for `size` datagrams (grown, never shrunk: the largest size asked for)."""
    global _capacity, bufs, names, in_iov, in_msgs, out_iov, out_msgs, held
    cdef int i
    if size <= _capacity:
        return 0
    free(bufs)
    free(names)
    free(in_iov)
    free(in_msgs)
    free(out_iov)
    free(out_msgs)
    free(held)
    _capacity = 0
    bufs = <char*>calloc(size, BUFLEN)
    names = <sockaddr_storage*>calloc(size, sizeof(sockaddr_storage))
    in_iov = <iovec*>calloc(size, sizeof(iovec))
    in_msgs = <mmsghdr*>calloc(size, sizeof(mmsghdr))
    out_iov = <iovec*>calloc(2 * size, sizeof(iovec))
    out_msgs = <mmsghdr*>calloc(size, sizeof(mmsghdr))
    held = <PyObject**>calloc(size, sizeof(PyObject*))
    if not (bufs and names and in_iov and in_msgs and out_iov and out_msgs and held):
        raise MemoryError()
    for i in range(size):
        in_iov[i].iov_base = bufs + i * BUFLEN
        in_iov[i].iov_len = BUFLEN
        in_msgs[i].msg_hdr.msg_iov = &in_iov[i]
        in_msgs[i].msg_hdr.msg_iovlen = 1
    _capacity = size
    return 0


cdef class Batch:
    """One UDP socket's hot path (see `agent.dns.udpbatch.Batch`)."""

    cdef object sock
    cdef readonly int size
    cdef readonly int family
    cdef uint8_t base6[16]
    cdef uint8_t mask6[16]
    cdef uint32_t base4
    cdef uint32_t mask4

    def __cinit__(self, sock, str subnet, int size=SIZE):
        cdef int i
        if size < 1:
            raise ValueError(f"batch size must be at least 1, not {size}")
        self.sock = sock
        self.size = size
        self.family = sock.family
        width = 128 if self.family == socket.AF_INET6 else 32
        base, _, bits = subnet.partition("/")
        mask = ((1 << width) - 1) ^ ((1 << (width - int(bits))) - 1)
        number = int.from_bytes(socket.inet_pton(self.family, base), "big") & mask
        if self.family == socket.AF_INET6:
            for i, octet in enumerate(number.to_bytes(16, "big")):
                self.base6[i] = octet
            for i, octet in enumerate(mask.to_bytes(16, "big")):
                self.mask6[i] = octet
        else:
            self.base4 = number
            self.mask4 = mask

    cdef bint _allowed(self, sockaddr_storage* name) noexcept nogil:
        cdef sockaddr_in* v4
        cdef sockaddr_in6* v6
        cdef int i
        if self.family == AF_INET6:
            v6 = <sockaddr_in6*>name
            if v6.sin6_family != AF_INET6 or v6.sin6_scope_id != 0:
                return False
            for i in range(16):
                if v6.sin6_addr.s6_addr[i] & self.mask6[i] != self.base6[i]:
                    return False
            return True
        v4 = <sockaddr_in*>name
        return v4.sin_family == AF_INET and ntohl(v4.sin_addr.s_addr) & self.mask4 == self.base4

    cdef object _source(self, sockaddr_storage* name):
        """The source as `socket.recvfrom` gives it."""
        cdef char text[ADDRSTRLEN]
        cdef sockaddr_in* v4
        cdef sockaddr_in6* v6
        if self.family == AF_INET6:
            v6 = <sockaddr_in6*>name
            inet_ntop(AF_INET6, &v6.sin6_addr, text, ADDRSTRLEN)
            return (text.decode("ascii"), ntohs(v6.sin6_port), ntohl(v6.sin6_flowinfo),
                    v6.sin6_scope_id)
        v4 = <sockaddr_in*>name
        inet_ntop(AF_INET, &v4.sin_addr, text, ADDRSTRLEN)
        return (text.decode("ascii"), ntohs(v4.sin_port))

    def serve(self, dict caches not None, key, turn):
        """Serve what is waiting: (read, turn, misses); see the pure twin."""
        global _busy
        cdef int fd = self.sock.fileno()
        if _busy:
            raise RuntimeError("Batch.serve is already running in another thread")
        _reserve(self.size)
        _busy = True
        try:
            return self._serve(fd, caches, key, turn)
        finally:
            _busy = False

    cdef object _serve(self, int fd, dict caches, object key, object turn):
        cdef int i, got, sent, start, count
        cdef unsigned int length
        cdef char* data
        cdef long long turns = turn
        cdef PyObject* found
        cdef object qkey, hit, cache
        cdef list misses = []
        cdef Py_ssize_t options
        for i in range(self.size):
            in_msgs[i].msg_hdr.msg_name = &names[i]
            in_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            in_msgs[i].msg_hdr.msg_flags = 0
        # with the GIL held (the call does not block): no other thread changes `caches`
        # between this read and the lookups below (see the pure twin's docstring)
        got = recvmmsg(fd, in_msgs, self.size, MSG_DONTWAIT, NULL)
        if got < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR:
                return 0, turns, misses
            raise OSError(errno, os.strerror(errno))
        found = PyDict_GetItem(caches, key)
        cache = None if found is NULL else <object>found
        if cache is not None and not isinstance(cache, dict):
            raise TypeError("a cache must be a dict")
        count = 0
        try:
            for i in range(got):
                length = in_msgs[i].msg_len
                if (length < HEADER or length > MAX_QUERY
                        or in_msgs[i].msg_hdr.msg_flags & MSG_TRUNC):
                    continue
                if not self._allowed(&names[i]):
                    continue
                data = bufs + i * BUFLEN
                found = NULL
                if cache is not None:
                    qkey = PyBytes_FromStringAndSize(data + 2, length - 2)
                    found = PyDict_GetItem(cache, qkey)
                if found is NULL or not PyTuple_Check(<object>found) or \
                        PyTuple_GET_SIZE(<object>found) == 0:
                    misses.append((PyBytes_FromStringAndSize(data, length),
                                   self._source(&names[i])))
                    continue
                options = PyTuple_GET_SIZE(<object>found)
                if options == 1:
                    hit = <object>PyTuple_GET_ITEM(<object>found, 0)
                else:
                    turns += 1
                    hit = <object>PyTuple_GET_ITEM(<object>found, turns % options)
                if not PyBytes_Check(hit):
                    raise TypeError("cached answers must be bytes")
                Py_INCREF(hit)
                held[count] = <PyObject*>hit
                out_iov[2 * count].iov_base = data
                out_iov[2 * count].iov_len = 2
                out_iov[2 * count + 1].iov_base = PyBytes_AS_STRING(hit)
                out_iov[2 * count + 1].iov_len = PyBytes_GET_SIZE(hit)
                memset(&out_msgs[count], 0, sizeof(mmsghdr))
                out_msgs[count].msg_hdr.msg_name = &names[i]
                out_msgs[count].msg_hdr.msg_namelen = in_msgs[i].msg_hdr.msg_namelen
                out_msgs[count].msg_hdr.msg_iov = &out_iov[2 * count]
                out_msgs[count].msg_hdr.msg_iovlen = 2
                count += 1
        finally:
            start = 0
            with nogil:
                while start < count:  # a failed message is skipped: UDP may lose it
                    sent = sendmmsg(fd, out_msgs + start, count - start, MSG_DONTWAIT)
                    start += sent if sent > 0 else 1
            for i in range(count):
                Py_DECREF(<object>held[i])
        return got, turns, misses
