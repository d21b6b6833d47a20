"""systemd integration: socket activation, readiness, watchdog and status.

Theory of operation. Under `systemd/agentd.service` (Type=notify) with `systemd/agentd.socket`:
- **Socket activation** (sd_listen_fds(3)): systemd opens the control socket and starts agentd
  with it as fd 3, `LISTEN_FDS=1` and `LISTEN_PID` = agentd's pid. `activated_socket` takes it
  (the API server then serves on it and never unlinks it: the socket unit owns the file);
  without those variables agentd binds `--socket` itself, as before.
- **Readiness** (sd_notify(3)): `READY=1` is sent once adoption, the firewall and the default
  network are in place and the API serves, so `systemctl start` returns (and units ordered
  after agentd start) only when requests can succeed; `STATUS=` tells what it is doing
  (`systemctl status`), `STOPPING=1` when it stops.
- **Watchdog**: with `WatchdogSec=`, systemd passes `WATCHDOG_USEC`; `serve_watchdog`, a task
  of the Trio loop, sends `WATCHDOG=1` every half of it. A loop that is stuck (a blocking call,
  a busy loop) sends nothing, and systemd kills and restarts agentd (`Restart=on-failure`);
  adoption converges at the next start.

The datagrams are sent by the `sdnotify` package (PyPI, pure Python, one class); its socket is
made non-blocking here, so a full notify queue drops one message instead of blocking the Trio
loop. `LISTEN_FDS` parsing is the few lines of sd_listen_fds(3) below: the well-kept packages that
have it (systemd-python, cysystemd) are C or Cython extensions built against libsystemd's
headers.
The variables are removed from the environment once read, as sd_listen_fds(3) and
sd_notify(3) do with `unset_environment`, so agentd's children (the kernel worker,
iptables-restore) do not take them for their own.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable

import sdnotify
import trio

from agent.log import get_logger

log = get_logger("agent.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
STATUS_INTERVAL = 5.0  # seconds between STATUS= refreshes when there is no watchdog


class ActivationError(Exception):
    """LISTEN_FDS was given for this process but holds no usable listening socket."""


def listen_fds(environ: dict[str, str] | None = None) -> list[int]:
    """The file descriptors systemd passed (sd_listen_fds(3)); [] when none were passed to this
    process. The variables are removed from the environment (os.environ unless `environ`).

    Error handling:
        ActivationError for a `LISTEN_FDS` that is not a count.
    """
    env: dict[str, str] | os._Environ[str] = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process (a parent that passed its environment on)
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number of file descriptors")
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))
    for fd in fds:
        os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds does
    return fds


def activated_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening Unix stream socket systemd passed, or None when agentd was not
    socket-activated.

    Error handling:
        ActivationError when descriptors were passed but none is a listening Unix stream
        socket (a socket unit with the wrong `ListenStream=` or `Accept=yes`).
    """
    fds = listen_fds(environ)
    for fd in fds:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            continue
        sock = socket.socket(fileno=fd)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM and listening:
            return sock
        sock.detach()  # not ours to close
    if fds:
        raise ActivationError(
            f"systemd passed {len(fds)} file descriptor(s) but no listening Unix stream socket "
            "(agentd.socket needs ListenStream=PATH and Accept=no)"
        )
    return None


class Notifier:
    """Sends sd_notify(3) messages to `NOTIFY_SOCKET`; does nothing when it is not set.

    Resource handling:
        The notify socket is opened at construction and lives as long as the process.
    """

    def __init__(self) -> None:
        self.watchdog_usec = _watchdog_usec()
        address = os.environ.get("NOTIFY_SOCKET")
        self._notifier = sdnotify.SystemdNotifier()  # connects to NOTIFY_SOCKET, if set
        os.environ.pop("NOTIFY_SOCKET", None)
        sock = getattr(self._notifier, "socket", None)
        if sock is not None:
            sock.setblocking(False)  # a full queue drops a message, never blocks the loop
        elif address:  # systemd would wait for READY=1 in vain: say why
            log.warning("systemd.notify.unreachable", notify_socket=address)
        self.enabled = sock is not None

    def notify(self, message: str) -> None:
        """Send one message (`READY=1`, `STATUS=...`, newline-separated assignments)."""
        if self.enabled:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")

    async def serve_watchdog(
        self, status: Callable[[], str], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """Until cancelled: `WATCHDOG=1` every half `WATCHDOG_USEC` (when systemd asked for
        it), and `STATUS=status()` whenever that text changes (checked at the same pace, or
        every `STATUS_INTERVAL` seconds without a watchdog)."""
        task_status.started()
        if not self.enabled:
            return
        period = self.watchdog_usec / 2e6 if self.watchdog_usec else STATUS_INTERVAL
        log.info("systemd.watchdog", period_s=period, watchdog=bool(self.watchdog_usec))
        last = ""
        while True:
            text = status()
            parts = ["WATCHDOG=1"] if self.watchdog_usec else []
            if text != last:
                parts.append(f"STATUS={text}")
                last = text
            if parts:
                self.notify("\n".join(parts))
            await trio.sleep(period)


def _watchdog_usec() -> int:
    """`WATCHDOG_USEC` if it is meant for this process (`WATCHDOG_PID`), else 0; both removed
    from the environment."""
    usec = os.environ.pop("WATCHDOG_USEC", "")
    pid = os.environ.pop("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return 0
    return int(usec) if usec.isdigit() else 0
