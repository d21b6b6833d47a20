"""iptables-restore and iptables-save processes: one transaction each, answered at its commit.

Theory of operation. `Restorer.restore` feeds one script to `iptables-restore --noflush` (the
applier serialises it); `Restorer.save` runs `iptables-save`. Each process runs shielded from
cancellation, bounded by `timeout`, and its pid is recorded in `own_pids` before it can commit
anything, so that the drift monitor knows its nftables notifications for the agent's own.

Answer at commit, not at exit: iptables-restore commits inside its `sendmsg`, but when it closes
its netlink socket after a commit that deleted anything, nf_tables waits for the deleted objects
to be freed, one RCU grace period (measured: 15-30 ms here, the whole cost of a `network rm`).
So the restore runs with `--verbose`, which echoes comment lines as it reads them, and the
script ends with the `COMMITTED` comment: once it is echoed, every COMMIT before it has
succeeded (a failed COMMIT exits before reading on). The transaction is then complete and the
process is left to `serve`, which reaps it as it exits. The wait moves rather than vanishes: the
socket is closed under nf_tables' commit mutex, so a transaction that comes within that grace
period waits for it at its own commit (back-to-back `network rm`: ~20 ms each; a lone one ~3).

Spare process: starting iptables-restore (exec, dynamic linking, netlink set-up) is ~0.8 ms of
a ~1.5 ms transaction. `serve` keeps one restore process started ahead, waiting on its stdin;
a transaction hands it its script and a new spare is started in the background. It reads the
kernel's tables only once it has the script, so it is never stale. Without `serve` running
(tests, tools), a transaction starts its own process and waits for its exit; so does it if the
spare died.

Error handling: every failure is a `FirewallApply` with `line` (the offending script line),
`line_number` and `stderr`; a process that overran `timeout` is killed and reported as
`RestoreTimeout` (a `FirewallApply` too): whether it committed is then unknown.
"""

from __future__ import annotations

import collections
import math
import re
import subprocess
from collections.abc import Sequence
from typing import Any

import trio

from agent.core.errors import FirewallApply
from agent.log import get_logger

log = get_logger("agent.firewall")

#: Appended to every restore script; `iptables-restore --verbose` echoes it once all before it
#: has committed (see the module docstring).
COMMITTED = b"# netagent: committed\n"
#: How many of the agent's own process ids are remembered (their notifications come late).
OWN_PIDS = 256
_LINE = re.compile(r"\bline:? (\d+)")
_NO_CHAIN = re.compile(r"Chain '([^']+)' does not exist")


class RestoreTimeout(FirewallApply):
    """A process overran its timeout and was killed: what it committed is unknown."""


def sections(text: str) -> list[tuple[str, int]]:
    """`(table, line number of its COMMIT)` for each section of a script text."""
    found, table = [], ""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith("*"):
            table = line[1:]
        elif line == "COMMIT":
            found.append((table, number))
    return found


def offending_line(text: str, stderr: str) -> tuple[int | None, str | None]:
    """Map iptables-restore's "line N" back to the script line it names.

    A jump to a missing chain is only noticed at COMMIT, whose line number is reported: then the
    last line of that section jumping to the chain is named instead.
    """
    match = _LINE.search(stderr)
    if match is None:
        return None, None
    number = int(match.group(1))
    lines = text.split("\n")
    if not 1 <= number <= len(lines):
        return number, None
    missing = _NO_CHAIN.search(stderr)
    if lines[number - 1] == "COMMIT" and missing is not None:
        for back in range(number - 1, 0, -1):
            if lines[back - 1].startswith("*"):
                break
            tokens = lines[back - 1].split()
            if missing.group(1) in tokens and ("-j" in tokens or "-g" in tokens):
                return back, lines[back - 1]
    return number, lines[number - 1]


async def discard(process: trio.Process) -> None:
    """Kill an unused restore process (it has read no script: nothing was applied), reap it
    and close its pipes."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


class Restorer:
    """Runs one family's iptables-restore and iptables-save (see the module docstring).

    Args:
        restore: iptables-restore binary (run by name through PATH).
        save: iptables-save binary.
        wait: pass `-w` (wait for the xtables lock) to iptables-restore.
        timeout: seconds one process may take; past it the outcome is unknown.
        own_pids: where the pids of the processes started are recorded (shared by the
            families: the drift monitor ignores them all); a new record if None.
    """

    def __init__(
        self,
        restore: str = "iptables-restore",
        save: str = "iptables-save",
        *,
        wait: bool = True,
        timeout: float = 30.0,
        own_pids: collections.deque[int] | None = None,
    ) -> None:
        self.restore_binary = restore
        self.save_binary = save
        self.wait = wait
        self.timeout = timeout
        #: pids of the agent's own iptables processes: their nftables notifications are not drift
        self.own_pids = collections.deque(maxlen=OWN_PIDS) if own_pids is None else own_pids
        self._spare: trio.Process | None = None  # an iptables-restore waiting for its script
        self._want_spare: trio.Event | None = None  # set when `serve` should start a spare
        #: where a restore that has committed goes to exit; None: wait for the exit in place
        self._exiting: trio.MemorySendChannel[trio.Process] | None = None

    def _restore_argv(self) -> list[str]:
        return [self.restore_binary, *(["-w"] if self.wait else []), "--noflush", "--verbose"]

    async def restore(self, text: str) -> None:
        """Apply one script (iptables-restore text), in the spare process if one is ready.

        Raises:
            FirewallApply: the restore failed (`line`, `line_number`, `stderr`), could not run,
                or timed out (`RestoreTimeout`).
        """
        spare, stdin = await self._take_spare(), text.encode() + COMMITTED
        if spare is None:
            await self._run(
                self._restore_argv(), stdin, what="iptables-restore", script=text, until=COMMITTED
            )
        else:
            self._result(await self._complete(spare, stdin, COMMITTED), "iptables-restore", text)

    async def save(self) -> str:
        """The output of one `iptables-save` (not for the hot path: ~100 ms at 10k rules).

        Raises:
            FirewallApply: it could not run, failed or timed out (`RestoreTimeout`).
        """
        return (await self._run([self.save_binary], b"", what="iptables-save")).decode()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: reap the restore processes that have committed as they exit, and keep
        a spare restore process (see the module docstring). On the way out, the idle spare is
        killed and the exiting processes are waited for."""
        send, receive = trio.open_memory_channel[trio.Process](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reap_exiting, receive)
            self._exiting = send
            task_status.started()
            await self._keep_spare()

    async def _reap_exiting(self, receive: trio.MemoryReceiveChannel[trio.Process]) -> None:
        try:
            async for process in receive:
                await self._reap(process)
        finally:
            self._exiting = None  # from now on, transactions wait for their own exits
            while True:
                try:
                    process = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await self._reap(process)

    async def _reap(self, process: trio.Process) -> None:
        """Wait (shielded, bounded by `timeout`) for a restore that has committed to exit."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.timeout):
                await process.wait()
            if process.returncode is None:
                log.warning("firewall.restore.hung", pid=process.pid)
                await discard(process)
        if process.returncode:
            log.warning("firewall.restore.exit", pid=process.pid, code=process.returncode)

    async def _keep_spare(self) -> None:
        """Keep one restore process started ahead until cancelled; the nf_tables backend only:
        a legacy iptables-restore may take the xtables lock when it starts, and an idle spare
        would hold it against every other iptables user."""
        try:
            argv = [self.restore_binary, "--version"]
            version = await self._run(argv, b"", what="restore --version")
        except FirewallApply as exc:
            log.warning("firewall.spare.disabled", error=exc.message)
            await trio.sleep_forever()
        if b"(nf_tables)" not in version:
            log.info("firewall.spare.disabled", reason="not the nf_tables backend")
            await trio.sleep_forever()
        self._want_spare = trio.Event()
        self._want_spare.set()
        try:
            while True:
                await self._want_spare.wait()
                self._want_spare = trio.Event()
                if self._spare is not None:  # asked for while the last one was starting
                    continue
                try:
                    self._spare = await self._open(self._restore_argv())
                except OSError as exc:  # transactions start their own and report it
                    log.warning("firewall.spare.failed", error=str(exc))
        finally:
            self._want_spare = None
            if self._spare is not None:
                await discard(self._spare)
                self._spare = None

    async def _take_spare(self) -> trio.Process | None:
        """The spare, if one is ready and alive; a new one is asked for either way."""
        spare, self._spare = self._spare, None
        if self._want_spare is not None:
            self._want_spare.set()
        if spare is not None and spare.returncode is not None:  # died waiting: its pipes go
            await discard(spare)
            return None
        return spare

    async def _open(self, argv: Sequence[str]) -> trio.Process:
        """Start a process with pipes, its pid recorded in `own_pids` (its nftables commits are
        ours). Raises OSError if it cannot start."""
        process = await trio.lowlevel.open_process(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.own_pids.append(process.pid)
        return process

    async def _complete(
        self, process: trio.Process, stdin: bytes, until: bytes = b""
    ) -> subprocess.CompletedProcess[bytes] | None:
        """Feed `stdin`, collect the output, wait for the exit: shielded from cancellation,
        bounded by `timeout` (then the process is killed and None returned).

        With `until`, the process has succeeded as soon as its stdout shows `until`: while
        `serve` runs, it is handed over to exit there and this returns at once (exit code 0).
        """
        out: dict[str, bytes] = {}
        done = False

        async def feed() -> None:
            assert process.stdin is not None
            async with process.stdin:
                await process.stdin.send_all(stdin)

        async def drain(name: str, stream: Any) -> None:
            nonlocal done
            chunks = []
            async with stream:
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
                    if until and name == "stdout" and until in b"".join(chunks):
                        done = True
                        if self._exiting is not None:
                            nursery.cancel_scope.cancel()
            out[name] = b"".join(chunks)

        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.timeout
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(feed)
                    nursery.start_soon(drain, "stdout", process.stdout)
                    nursery.start_soon(drain, "stderr", process.stderr)
            except BaseExceptionGroup as group:  # stdin closed early: it failed at start-up
                _, rest = group.split((trio.BrokenResourceError, trio.ClosedResourceError))
                if rest is not None:
                    raise
            if done and self._exiting is not None:
                self._exiting.send_nowait(process)
                return subprocess.CompletedProcess(process.args, 0, out.get("stdout", b""), b"")
            code = await process.wait()
            return subprocess.CompletedProcess(
                process.args, code, out.get("stdout", b""), out.get("stderr", b"")
            )
        await discard(process)  # timed out
        return None

    def _result(
        self, result: subprocess.CompletedProcess[bytes] | None, what: str, script: str = ""
    ) -> bytes:
        """The output of a completed process, or FirewallApply for a timeout or a failure."""
        if result is None:
            raise RestoreTimeout(f"{what} timed out after {self.timeout} s", stderr="")
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            number, line = offending_line(script, stderr) if script else (None, None)
            raise FirewallApply(
                f"{what} failed (exit {result.returncode}): {stderr or 'no message'}",
                line=line,
                line_number=number,
                stderr=stderr,
            )
        return result.stdout

    async def _run(
        self, argv: Sequence[str], stdin: bytes, *, what: str, script: str = "", until: bytes = b""
    ) -> bytes:
        """Run one process to completion (or to `until`, see `_complete`), shielded from
        cancellation, bounded by `timeout`."""
        try:
            process = await self._open(argv)
        except OSError as exc:
            raise FirewallApply(f"{what} could not run: {exc}", stderr=str(exc)) from exc
        return self._result(await self._complete(process, stdin, until), what, script)
