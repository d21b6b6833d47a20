"""Network namespaces without forking: named ones like `ip netns`, and sockets opened inside.

Theory of operation: a network namespace is a file on nsfs (`/run/netns/NAME`, a bind mount,
or `/proc/PID/ns/net`). Its identity is the (st_dev, st_ino) of that file. `setns` and
`unshare(CLONE_NEWNET)` switch only the calling thread, and a netlink socket stays bound to the
namespace it was created in. So the kernel owner thread opens a socket inside a namespace by
entering it for that one `socket()` call and coming straight back (`socket_visiting`); a named
namespace is made by a throwaway thread that unshares and exits. Forking for either costs
5-6 ms (DESIGN section 4). Python 3.11 has no `os.setns`: libc via
ctypes. Named namespaces follow iproute2's `netns_add`, so `ip netns list/exec` see ours.
Namespace ids (RTM_NEWNSID) are given out counting down (`NsidCounter`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import threading

from agent.core import naming
from agent.core.errors import Conflict, InvalidArgument, KernelError, NotFound
from agent.kernel import rtnl
from agent.kernel.threads import run_in_fresh_thread, run_sync_in_fresh_thread

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): ioctl on an nsfs file, returns its CLONE_NEW* type
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode(), target.encode(), b"none", flags, None), "mount")


def resolve(netns: str) -> str:
    """A bare name becomes /run/netns/NAME (validated); an absolute path is kept."""
    if netns.startswith("/"):
        return netns
    return os.path.join(NETNS_RUN_DIR, naming.validate_netns_name(netns))


def open_netns(path: str) -> int:
    """An O_RDONLY fd on the namespace file at `path`; the caller closes it.

    Error handling:
        NotFound if the path does not exist, InvalidArgument if it is no network namespace.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"network namespace {path} does not exist", netns=path) from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot open namespace {path}: {exc.strerror}", netns=path) from exc
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        os.close(fd)
        raise InvalidArgument(f"{path} is not a namespace file", netns=path) from exc
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise InvalidArgument(f"{path} is not a network namespace", netns=path)
    return fd


def netns_key(path: str) -> str:
    """ "st_dev:st_ino" of the namespace file: equal keys mean the same namespace."""
    fd = open_netns(path)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return f"{st.st_dev}:{st.st_ino}"


#: Namespaces that are never a connect target: agentd's own, and PID 1's (the host's).
OWN_NAMESPACES = ("/proc/self/ns/net", "/proc/1/ns/net")


def own_keys() -> frozenset[str]:
    """The keys of `OWN_NAMESPACES` that can be read (PID 1's may be hidden from us)."""
    keys = set()
    for path in OWN_NAMESPACES:
        try:
            keys.add(netns_key(path))
        except (NotFound, InvalidArgument):
            continue
    return frozenset(keys)


def target_key(path: str, forbidden: frozenset[str]) -> str:
    """`netns_key(path)`, refusing a namespace in `forbidden` (see `own_keys`).

    Error handling:
        InvalidArgument if `path` is agentd's own or the host's namespace, however it is
        named (`/proc/self/ns/net`, `/proc/<pid>/ns/net`, a bind mount of it...).
    """
    key = netns_key(path)
    if key in forbidden:
        raise InvalidArgument(
            f"{path} is agentd's own (the host's) network namespace: it cannot be a target",
            netns=path,
        )
    return key


def socket_visiting(fd: int, home: int, proto: int = 0) -> socket.socket:
    """A netlink socket (NETLINK_ROUTE by default) living in the namespace behind `fd`, opened
    by the calling thread: it enters that namespace for the `socket()` call only, then goes back
    to `home` (an fd on its own namespace): ~0.2 ms less per attach than a throwaway thread.

    Error handling:
        OSError if the namespace cannot be entered or the socket not made (the thread is home).
        If the way back fails, the process exits (status 70): nothing meant for the host may
        ever reach a container's namespace.
    """
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
    finally:
        if _libc.setns(home, CLONE_NEWNET) != 0:
            why = os.strerror(ctypes.get_errno())
            os.write(2, f"agentd: cannot return to its own network namespace: {why}\n".encode())
            os._exit(70)


#: Namespace ids the agent gives out, counting down (see `NsidCounter`); the kernel's own ids
#: count up from 0 and never get near.
NSID_TOP, NSID_FLOOR = 1 << 30, 1 << 29


class NsidCounter:
    """Namespace ids that count down, so that the kernel finds the newest first.

    The kernel finds the id of a veth peer's namespace (for every notification about the host
    end) by scanning the host's ids in ascending order, one per container namespace, and gives
    a new namespace the lowest free one, so an attach among 10,000 endpoints scanned them all,
    five times. Given, with its first veth, an id below every earlier one (RTM_NEWNSID), a
    namespace's attach finds its own first. A detach scans past the namespaces attached after
    it and still there.
    """

    def __init__(self) -> None:
        self._next = NSID_TOP
        self._claimed: set[tuple[int, int]] = set()  # (dev, inode) of namespaces with our id

    def resume(self, ids: list[int]) -> None:
        """After a restart, go on below the lowest of our ids among `ids` (the kernel's)."""
        ours = [i for i in ids if i >= NSID_FLOOR]
        self._next = min(ours) - 1 if ours else NSID_TOP

    def claim(self, fd: int) -> rtnl.Request | None:
        """The request giving the namespace behind `fd` the next id, or None if it was given
        one (or found to have one) already. Best effort: an EEXIST reply (it has an id, say
        from someone else, or the id is taken) is to be ignored."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self._claimed:  # the id lives as long as the namespace: once is enough
            return None
        if len(self._claimed) >= 1 << 16:
            self._claimed.clear()  # an inode reused since costs one EEXIST, nothing more
        self._claimed.add(key)
        if self._next < NSID_FLOOR:
            self._next = NSID_TOP  # 2^29 attaches later: the old ids are long gone
        self._next -= 1
        return rtnl.new_nsid(fd, self._next + 1)


def _ensure_run_dir() -> None:
    """iproute2's recipe: /run/netns is a shared mount point, so mounts under it propagate."""
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    try:
        _mount("", NETNS_RUN_DIR, MS_SHARED | MS_REC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _mount(NETNS_RUN_DIR, NETNS_RUN_DIR, MS_BIND | MS_REC)  # not yet a mount point
        _mount("", NETNS_RUN_DIR, MS_SHARED | MS_REC)


def _unshare_and_bind(path: str) -> None:
    _check(_libc.unshare(CLONE_NEWNET), "unshare")
    _mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, MS_BIND)


def _create_named(name: str, path: str) -> None:
    _ensure_run_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError as exc:
        raise Conflict(f"network namespace {name!r} already exists", netns=name) from exc
    try:
        run_sync_in_fresh_thread(_unshare_and_bind, path)
    except BaseException:
        os.unlink(path)
        raise


async def create_named(name: str) -> str:
    """Create /run/netns/NAME like `ip netns add NAME`, without forking; returns the path.

    Error handling:
        Conflict if it exists; InvalidArgument for a bad name; KernelError otherwise.
    """
    path = resolve(naming.validate_netns_name(name))
    try:
        await run_in_fresh_thread(_create_named, name, path)
    except OSError as exc:
        raise KernelError(f"cannot create namespace {name!r}: {exc}", netns=name) from exc
    return path


def _delete_named(path: str) -> bool:
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (a stale file)
            raise OSError(err, f"umount2 {path}: {os.strerror(err)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


async def delete_named(name: str) -> bool:
    """Remove /run/netns/NAME like `ip netns delete`; False if it did not exist."""
    path = resolve(naming.validate_netns_name(name))
    try:
        return await run_in_fresh_thread(_delete_named, path)
    except OSError as exc:
        raise KernelError(f"cannot delete namespace {name!r}: {exc}", netns=name) from exc


#: where `ip netns exec NAME` finds files it bind-mounts over /etc (iproute2's NETNS_ETC_DIR)
ETC_NETNS = "/etc/netns"


def write_etc(etc_dir: str, name: str, filename: str, text: str) -> None:
    """Write ETC_DIR/NAME/FILENAME (atomically: a temporary file renamed over it).

    Error handling:
        KernelError naming the file when it cannot be written.
    """
    folder = os.path.join(etc_dir, naming.validate_netns_name(name))
    path = os.path.join(folder, filename)
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise KernelError(f"cannot write {path}: {exc}", netns=name) from exc


def remove_etc(etc_dir: str, name: str, filename: str) -> None:
    """Remove ETC_DIR/NAME/FILENAME, then the folder if nothing else is in it (best effort:
    a file the user put there stays)."""
    folder = os.path.join(etc_dir, naming.validate_netns_name(name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, filename))
    with contextlib.suppress(OSError):
        os.rmdir(folder)
