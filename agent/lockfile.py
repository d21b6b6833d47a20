"""One agentd per state directory: an exclusive `flock` on `<state-dir>/lock`.

Theory of operation: the lock is taken before anything else (store, kernel, socket) and held,
by an open descriptor, for the life of the process; the kernel drops it when the process exits,
however it exits (kill -9 included), so a stale lock file never blocks a restart. The file
records the holder's pid, for the message a second instance prints.

Error handling: `AlreadyRunning` (with the holder's pid when known) if another process holds
the lock; the second agentd exits with `EXIT_ALREADY_RUNNING` and touches nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

LOCK_NAME = "lock"
EXIT_ALREADY_RUNNING = 75  # EX_TEMPFAIL: another instance holds the state directory


class AlreadyRunning(Exception):
    """Another process holds the state directory's lock."""

    def __init__(self, path: str, holder: int | None) -> None:
        who = f"pid {holder}" if holder else "another process"
        super().__init__(
            f"another agentd ({who}) is running on the state directory "
            f"{os.path.dirname(path)} (lock {path}): not starting a second one"
        )
        self.path = path
        self.holder = holder


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    return None


@contextlib.contextmanager
def hold_state_dir(state_dir: str) -> Iterator[str]:
    """Hold the exclusive lock of `state_dir` (created 0700 if missing) for the block.

    Raises:
        AlreadyRunning: another process holds it.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(path, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race a waiter)
