"""The control socket's limits and guards: connection count, idle time, request deadline,
rate-limited logging of client errors, and a socket path that is never taken from its owner.

Theory of operation:
- `Limits` holds the numbers `agentd --max-connections/--idle-timeout/--request-timeout` give.
  The default connection limit is half the soft `RLIMIT_NOFILE` (at most 1,024): agentd keeps
  descriptors for its store, netlink sockets, worker and firewall tools, so clients alone can
  never run it out of them. A connection past the limit is accepted, told "too many
  connections" and closed; if accept itself fails for want of descriptors (EMFILE), the server
  backs off (`accept_backoff`) instead of spinning.
- `LogLimiter`: a token bucket per key (the event and the peer's uid), so that a client
  repeating a bad request cannot flood the log; the next line let through says how many were
  suppressed.
- `claim_socket` binds the socket path only if nobody serves it: a live socket (connect
  succeeds) is another process's and is left alone; a dead one is replaced. `release_socket`
  unlinks the path only if it is still the very file this process bound (same inode).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import resource
import socket as stdsocket
import stat
from collections import OrderedDict
from dataclasses import dataclass

#: accept() errors that mean "out of descriptors or memory": back off, then retry.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
MAX_CONNECTIONS_CAP = 1024
MIN_CONNECTIONS = 8


def default_max_connections() -> int:
    """Half the soft descriptor limit, between `MIN_CONNECTIONS` and `MAX_CONNECTIONS_CAP`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CAP
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS_CAP, soft // 2))


@dataclass(frozen=True)
class Limits:
    """What one client may take. `max_connections` None: `default_max_connections()`."""

    max_connections: int | None = None
    idle_timeout: float = 60.0  # seconds a connection may wait between requests
    request_timeout: float | None = 30.0  # seconds a request has to begin its kernel work

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.idle_timeout <= 0 or (self.request_timeout or 1) <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def connections(self) -> int:
        return self.max_connections or default_max_connections()


def accept_backoff(previous: float) -> float:
    """The next pause after accept() ran out of descriptors: 10 ms doubling up to 1 s."""
    return min(1.0, max(0.01, previous * 2))


class LogLimiter:
    """Token buckets by key: `rate` lines per second after a burst of `burst`.

    `allow(key, now)` returns None when the line must be dropped, else the number of lines
    dropped for that key since the last one let through (0 usually). At most `keys` keys are
    kept (the least recently used go first), so memory stays bounded whatever clients do.
    """

    def __init__(self, rate: float = 1.0, burst: int = 5, keys: int = 1024) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        self._buckets: OrderedDict[object, list[float]] = OrderedDict()  # tokens, stamp, dropped

    def allow(self, key: object, now: float) -> int | None:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = [float(self.burst), now, 0.0]
        self._buckets[key] = bucket
        if len(self._buckets) > self.keys:
            self._buckets.popitem(last=False)
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            bucket[2] += 1
            return None
        bucket[0] = tokens - 1.0
        dropped, bucket[2] = int(bucket[2]), 0.0
        return dropped


class SocketInUse(Exception):
    """The socket path is served by another process (or is not a socket at all)."""


@dataclass
class Claimed:
    """A listening socket this process bound at `path`, and the identity of that file."""

    sock: stdsocket.socket
    path: str
    identity: tuple[int, int, int] | None

    def release(self) -> bool:
        """Close the socket; unlink `path` if it is still the file bound here. Idempotent."""
        self.sock.close()
        identity, self.identity = self.identity, None
        return release_socket(self.path, identity)


def claim_socket(path: str, group: str | None = None, mode: int = 0o660) -> Claimed:
    """A listening Unix socket at `path`, mode `mode`, owned by root and `group`.

    Error handling:
        SocketInUse if a process answers on `path`, or `path` is something other than a
        socket; a dead socket file (nobody listening) is replaced.
    """
    gid = grp.getgrnam(group).gr_gid if group else None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUse(f"{path} exists and is not a socket: not replacing it")
        probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its owner is gone
        except OSError:
            pass  # e.g. EAGAIN (backlog full): someone listens; bind fails below
        else:
            raise SocketInUse(f"another process is serving {path}: not taking it over")
        finally:
            probe.close()
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1024)  # at once: a bound socket that refuses connections looks stale
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SocketInUse(f"{path} is in use by another process") from exc
        raise
    claimed = Claimed(sock, path, socket_identity(path))
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, 0, gid)
        claimed.identity = socket_identity(path)  # the change time moved
    except BaseException:
        claimed.release()
        raise
    return claimed


def socket_identity(path: str) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, st_ctime_ns) of the file at `path`, or None if there is none: the
    change time tells a new file from an old one that had the same (reused) inode."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def release_socket(path: str, identity: tuple[int, int, int] | None) -> bool:
    """Unlink `path` if it is still the file this process bound (`identity`); True if so."""
    if identity is None or socket_identity(path) != identity:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
