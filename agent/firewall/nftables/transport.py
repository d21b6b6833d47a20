"""Two ways to run an nft script: libnftables in process (ctypes), or the `nft` tool.

Both parse the same script text with the same library (the `nft` tool is a thin front end of
libnftables.so.1) and send it as one netlink batch: one atomic transaction. `LibNftables`
binds the handful of `nft_ctx_*` functions the way Debian's python3-nftables does (its
`nftables.Nftables` is not importable from the agent's virtualenv, and needs nothing more than
this); the `nft` tool costs a fork and exec per transaction. Measured by
bench/bench_dataplane.py (`transport` section): see docs/ARCHITECTURE.md.

Both are synchronous; the backend calls them from one worker thread at a time
(`trio.to_thread.run_sync` with a limiter of one). `pids` collects the ids of the threads and
processes that committed, which the kernel names in each transaction's NEWGEN notification
(`agent.firewall.monitor`), so the backend can tell its own commits from anyone else's.

Error handling: a failed run raises `NftError` with nft's message (the offending command and
a caret line); nothing was committed.
"""

from __future__ import annotations

import collections
import ctypes
import subprocess
import threading
from typing import Protocol

OUTPUT_STATELESS = 1 << 2
OWN_PIDS = 64


class NftError(Exception):
    """An nft script was refused (nothing committed); the message is nft's."""


class Transport(Protocol):
    """Runs one nft script as one transaction; returns what nft printed."""

    name: str
    pids: collections.deque[int]

    def run(self, script: str) -> str: ...


class LibNftables:
    """libnftables.so.1 through ctypes: one context, output and errors buffered."""

    name = "libnftables"

    def __init__(self, soname: str = "libnftables.so.1") -> None:
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
        except OSError as exc:
            raise NftError(f"cannot load {soname} (Debian: libnftables1): {exc}") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_int]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_STATELESS)
        self._lock = threading.Lock()
        self.pids: collections.deque[int] = collections.deque(maxlen=OWN_PIDS)

    def run(self, script: str) -> str:
        with self._lock:
            tid = threading.get_native_id()
            if tid not in self.pids:
                self.pids.append(tid)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft failed ({rc})")
        return out.decode(errors="replace")

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class NftTool:
    """The `nft` tool: `nft -s -f -`, the script on stdin."""

    name = "nft"

    def __init__(self, argv0: str = "nft") -> None:
        self.argv0 = argv0
        self.pids: collections.deque[int] = collections.deque(maxlen=OWN_PIDS)

    def run(self, script: str) -> str:
        proc = subprocess.Popen(
            [self.argv0, "-s", "-f", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pids.append(proc.pid)
        out, err = proc.communicate(script.encode(), timeout=30)
        if proc.returncode != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft exited {proc.returncode}")
        return out.decode(errors="replace")


def create(kind: str = "libnftables") -> Transport:
    """`libnftables` (in process) or `nft` (the tool)."""
    return LibNftables() if kind == "libnftables" else NftTool()
