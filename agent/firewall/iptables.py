"""The iptables applier: render (core) -> serialise (_fast) -> one `iptables-restore --noflush`.

Theory of operation. `applied` is the ruleset the kernel holds, as last applied; the kernel is
never re-listed on the hot path (`iptables-save` costs ~100 ms at 10k rules). `setup` converges
from anything at start-up: ONE `iptables-save` finds our chains, the built-in jumps and
NETAGENT-USER, then ONE restore of `rules.full` rewrites every agent chain. `sync` restores only
`rules.diff(applied, desired)`.

iptables-restore commits each `*table` section separately (measured with 1.8.9 nf_tables: a
failure in `*nat` leaves the `*filter` section applied). A failed transaction is therefore
mapped back to the table it failed in; sections committed before it are undone with the
inverse diff, so `applied` stays true. If that rollback fails too, or the outcome is unknown
(timeout, no line number), the next `sync` converges with a full `setup` instead.

Published ports: `sync` and `setup` take the endpoints too (None: the ones last given, so a
caller that changes only networks cannot drop ports by omission). After a transaction, the
conntrack entries of every mapping that went away are deleted (`conntrack -D`), so an
established flow does not keep reaching a port that is no longer published; and each bridge
with published ports gets `net.ipv4.conf.<bridge>.route_localnet=1` so that the DNAT of
127.0.0.1 traffic out of it is not dropped as martian.

Answer at commit, not at exit: iptables-restore commits inside its `sendmsg`, but when it closes
its netlink socket after a commit that deleted anything, nf_tables waits for the deleted objects
to be freed, one RCU grace period (measured: 15-30 ms here, the whole cost of a `network rm`).
So the restore runs with `--verbose`, which echoes comment lines as it reads them, and the
script ends with the `_COMMITTED` comment: once it is echoed, every COMMIT before it has
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
`line_number`, `stderr`, `rolled_back`. Cancellation never lands inside a restore: each
process runs shielded, bounded by `timeout`.
"""

from __future__ import annotations

import collections
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from agent import accel
from agent.core import naming, rules
from agent.core.errors import FirewallApply
from agent.core.model import Endpoint, Network, PortMapping
from agent.core.serialize import format_op
from agent.firewall import conntrack
from agent.log import get_logger

log = get_logger("agent.firewall")

#: Appended to every restore script; `iptables-restore --verbose` echoes it once all before it
#: has committed (see the module docstring).
_COMMITTED = b"# netagent: committed\n"
_LINE = re.compile(r"\bline:? (\d+)")
_NO_CHAIN = re.compile(r"Chain '([^']+)' does not exist")


@dataclass
class Observed:
    """What one `iptables-save` says about the agent's footprint (filter and nat only)."""

    chains: dict[rules.ChainKey, list[rules.Rule]] = field(default_factory=dict)  # NETAGENT*
    lines: dict[tuple[str, str], int] = field(default_factory=dict)  # other chains' -A lines
    foreign_refs: set[rules.ChainKey] = field(default_factory=set)  # our chains they jump to

    def user_chain_exists(self) -> bool:
        return (rules.FILTER, rules.USER) in self.chains

    def missing_jumps(self) -> list[tuple[str, str, rules.Rule]]:
        return [
            (table, chain, rule)
            for table, chain, rule in rules.builtin_jumps()
            if (table, format_op("-A", chain, rule)) not in self.lines
        ]

    def ruleset(self) -> rules.Ruleset:
        """The agent's chains as found (NETAGENT-USER aside), comparable with `applied`."""
        tables: dict[str, dict[str, tuple[rules.Rule, ...]]] = {}
        for (table, chain), found in self.chains.items():
            if chain != rules.USER:
                tables.setdefault(table, {})[chain] = tuple(found)
        heads = {k: h for k, h in rules.DISPATCH_HEADS.items() if k in self.chains}
        return rules.Ruleset(tables, heads)


def split_line(line: str) -> list[str]:
    """Tokens of an iptables-save line, undoing its quoting (as iptables-restore reads it)."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = in_quotes = escaped = False
    for char in line:
        if in_quotes and escaped:
            current.append(char)
            escaped = False
        elif in_quotes and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes, quoted = not in_quotes, True
        elif char in " \t" and not in_quotes:
            if current or quoted:
                tokens.append("".join(current))
            current, quoted = [], False
        else:
            current.append(char)
    if current or quoted:
        tokens.append("".join(current))
    return tokens


def parse_save(text: str) -> Observed:
    """Parse `iptables-save` output: our chains and rules, the jumps into them from elsewhere."""
    seen = Observed()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif table not in rules.TABLE_ORDER:
            continue
        elif line.startswith(":") and line[1:].startswith(naming.CHAIN_PREFIX):
            seen.chains.setdefault((table, line[1:].split(" ", 1)[0]), [])
        elif line.startswith("-A "):
            tokens = split_line(line)
            if tokens[1].startswith(naming.CHAIN_PREFIX):
                seen.chains.setdefault((table, tokens[1]), []).append(tuple(tokens[2:]))
                continue
            key = (table, line)
            seen.lines[key] = seen.lines.get(key, 0) + 1
            for i, token in enumerate(tokens[:-1]):
                if token in ("-j", "-g") and tokens[i + 1].startswith(naming.CHAIN_PREFIX):
                    seen.foreign_refs.add((table, tokens[i + 1]))
    return seen


def _sections(text: str) -> list[tuple[str, int]]:
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


def _drift(seen: Observed, new: rules.Ruleset) -> list[str]:
    """What differs between the kernel (`seen`) and the desired ruleset, one line each."""
    problems = [f"jump {table}/{chain} restored" for table, chain, _ in seen.missing_jumps()]
    if not seen.user_chain_exists():
        problems.append(f"chain filter/{rules.USER} recreated")
    found = seen.ruleset()
    for table, chain, want in new.items():
        have = found.chains(table).get(chain)
        head = new.head(table, chain)  # dispatch chains: rule order after the head is free
        if have is None:
            problems.append(f"chain {table}/{chain} recreated")
        elif not _same_rules(have, want, head):
            problems.append(f"chain {table}/{chain} rewritten")
    problems += [f"chain {t}/{c} removed" for t, c in sorted(rules.stale(seen.chains, new))]
    return problems


def _same_rules(have: Sequence[rules.Rule], want: Sequence[rules.Rule], head: int | None) -> bool:
    if head is None:
        return tuple(have) == tuple(want)
    return tuple(have[:head]) == tuple(want[:head]) and sorted(have[head:]) == sorted(want[head:])


def _merge(old: rules.Ruleset, new: rules.Ruleset, tables: Iterable[str]) -> rules.Ruleset:
    """`old` with `tables` taken from `new`: what the kernel holds after a partial commit."""
    taken = set(tables)
    merged = {t: c for t, c in old.tables.items() if t not in taken}
    merged.update({t: c for t, c in new.tables.items() if t in taken})
    heads = {k: h for k, h in old.heads.items() if k[0] not in taken}
    heads.update({k: h for k, h in new.heads.items() if k[0] in taken})
    return rules.Ruleset(merged, heads)


async def _discard(process: trio.Process) -> None:
    """Kill an unused restore process (it has read no script: nothing was applied), reap it
    and close its pipes."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


class IptablesFirewall:
    """Programs the agent's iptables chains; one writer at a time.

    Args:
        restore: iptables-restore binary (run by name through PATH).
        save: iptables-save binary.
        serialize: `Script -> str`; the Cython accelerator when built.
        wait: pass `-w` (wait for the xtables lock) to iptables-restore.
        timeout: seconds one process may take; past it the outcome is unknown.
        family: 4 (iptables) or 6 (ip6tables: `rules.render(..., family=6)`, give the
            ip6tables binaries too).
    """

    def __init__(
        self,
        *,
        restore: str = "iptables-restore",
        save: str = "iptables-save",
        serialize: Callable[[rules.Script], str] = accel.serialize.serialize,
        wait: bool = True,
        timeout: float = 30.0,
        family: int = 4,
    ) -> None:
        self.family = family
        self.restore = restore
        self.save = save
        self.serialize = serialize
        self.wait = wait
        self.timeout = timeout
        self.applied: rules.Ruleset = rules.EMPTY
        self._converged = False
        self._lock = trio.Lock()
        #: pids of the agent's own iptables processes: their nftables notifications are not drift
        self.own_pids: collections.deque[int] = collections.deque(maxlen=256)
        self._endpoints: tuple[Endpoint, ...] = ()
        self._published: set[tuple[str, str, PortMapping]] = set()  # (bridge, ip, mapping)
        self._spare: trio.Process | None = None  # an iptables-restore waiting for its script
        self._want_spare: trio.Event | None = None  # set when `serve` should start a spare
        #: where a restore that has committed goes to exit; None: wait for the exit in place
        self._exiting: trio.MemorySendChannel[trio.Process] | None = None

    def _desired(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None
    ) -> tuple[rules.Ruleset, list[Network], tuple[Endpoint, ...]]:
        networks = list(networks)
        eps = self._endpoints if endpoints is None else tuple(endpoints)
        return rules.render(networks, eps, family=self.family), networks, eps

    async def _ports_applied(self, networks: list[Network], eps: tuple[Endpoint, ...]) -> None:
        """route_localnet on bridges with ports; conntrack flush of the mappings that went away."""
        self._endpoints = eps
        usable = {n.id: n.bridge for n in networks if not n.internal}
        v4 = self.family == 4
        now = {
            (usable[ep.network_id], ip, m)
            for ep in self._endpoints
            if ep.network_id in usable and (ip := ep.ip if v4 else ep.ip6)
            for m in ep.ports
            if rules.mapped_for(m, self.family)
        }
        for bridge in sorted({b for b, _, _ in now - self._published}) if v4 else ():
            conntrack.route_localnet(bridge)
        gone = self._published - now
        self._published = now
        if gone:
            await conntrack.flush([(ip, m) for _, ip, m in sorted(gone)])

    async def setup(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> None:
        """Converge the kernel to `networks` from whatever it holds (start-up, repair).

        Foreign rules and chains are untouched; NETAGENT-USER is created only if missing; stale
        NETAGENT-* chains are flushed and deleted (only flushed if a foreign rule jumps to them).

        Raises:
            FirewallApply: iptables-save or iptables-restore failed; `applied` is unchanged.
        """
        new, nets, eps = self._desired(networks, endpoints)
        async with self._lock:
            await self._converge(new)
            await self._ports_applied(nets, eps)

    async def sync(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> int:
        """Apply the difference between `applied` and `networks`' ruleset; return its op count.

        Raises:
            FirewallApply: the transaction failed; `applied` still matches the kernel (rolled
                back), or the next call converges with a full setup.
        """
        new, nets, eps = self._desired(networks, endpoints)
        async with self._lock:
            if not self._converged:
                count = await self._converge(new)
            else:
                script = rules.diff(self.applied, new)
                count = len(script)
                if script:
                    await self._apply_diff(script, new)
                    self.applied = new
            await self._ports_applied(nets, eps)
            return count

    def bridge_recreated(self, bridge: str) -> None:
        """A bridge came back (repair): its sysctls went with the old device; restore ours."""
        if self.family == 4 and any(b == bridge for b, _, _ in self._published):
            conntrack.route_localnet(bridge)

    def text(self) -> str:
        """The ruleset as iptables-restore would be fed it from scratch (`agentctl ruleset`)."""
        return self.serialize(rules.full(self.applied))

    def rule_count(self) -> int:
        """Rules in the agent's chains (built-in jumps and NETAGENT-USER not counted)."""
        return self.applied.rule_count()

    async def repair(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> list[str]:
        """Compare the kernel with the desired ruleset (one iptables-save) and converge it if
        anything differs; returns what was repaired (empty when nothing had drifted)."""
        new, _, _ = self._desired(networks, endpoints)
        async with self._lock:
            seen = await self.observe()
            problems = _drift(seen, new)
            if problems:
                await self._converge(new)
            return problems

    async def observe(self) -> Observed:
        """One `iptables-save`, parsed: for drift checks (`observe().ruleset() != applied`).

        Not for the hot path: iptables-save takes ~100 ms at 10k rules.
        """
        return parse_save((await self._run([self.save], b"", what="iptables-save")).decode())

    async def _converge(self, new: rules.Ruleset) -> int:
        self._converged = False
        seen = await self.observe()
        stale = rules.stale(seen.chains, new)
        if (
            not stale
            and seen.user_chain_exists()
            and not seen.missing_jumps()
            and seen.ruleset() == new
        ):  # already converged (a restart): rewrite nothing
            self.applied = new
            self._converged = True
            return 0
        script = rules.full(
            new,
            missing_jumps=seen.missing_jumps(),
            user_chain_exists=seen.user_chain_exists(),
            stale_chains=stale,
            flush_only=stale & seen.foreign_refs,  # -X would fail while a foreign rule jumps there
        )
        await self._restore(script)
        self.applied = new
        self._converged = True
        return len(script)

    async def _apply_diff(self, script: rules.Script, new: rules.Ruleset) -> None:
        try:
            await self._restore(script)
        except FirewallApply as exc:
            number = exc.data.get("line_number")
            if number is None:
                self._converged = False
                raise
            text = self.serialize(script)
            committed = [t for t, commit in _sections(text) if commit < number]
            if committed:
                await self._rollback(_merge(self.applied, new, committed), exc)
            exc.data["rolled_back"] = True
            raise

    async def _rollback(self, partial: rules.Ruleset, exc: FirewallApply) -> None:
        """Undo the sections that committed before the failing one."""
        try:
            await self._restore(rules.diff(partial, self.applied))
        except FirewallApply as again:
            log.error("firewall.rollback.failed", stderr=again.data.get("stderr"))
            self.applied = partial
            self._converged = False
            exc.data["rolled_back"] = False
            raise exc from again
        log.warning("firewall.rollback.complete", line=exc.data.get("line"))

    def _restore_argv(self) -> list[str]:
        return [self.restore, *(["-w"] if self.wait else []), "--noflush", "--verbose"]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
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
                await _discard(process)
        if process.returncode:
            log.warning("firewall.restore.exit", pid=process.pid, code=process.returncode)

    async def _keep_spare(self) -> None:
        """Keep one restore process started ahead until cancelled; the nf_tables backend only:
        a legacy iptables-restore may take the xtables lock when it starts, and an idle spare
        would hold it against every other iptables user."""
        try:
            version = await self._run([self.restore, "--version"], b"", what="restore --version")
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
                await _discard(self._spare)
                self._spare = None

    async def _take_spare(self) -> trio.Process | None:
        """The spare, if one is ready and alive; a new one is asked for either way."""
        spare, self._spare = self._spare, None
        if self._want_spare is not None:
            self._want_spare.set()
        if spare is not None and spare.returncode is not None:  # died waiting: its pipes go
            await _discard(spare)
            return None
        return spare

    async def _restore(self, script: rules.Script) -> None:
        text = self.serialize(script)
        start = time.perf_counter()
        spare, stdin = await self._take_spare(), text.encode() + _COMMITTED
        if spare is None:
            await self._run(
                self._restore_argv(), stdin, what="iptables-restore", script=text, until=_COMMITTED
            )
        else:
            self._result(await self._complete(spare, stdin, _COMMITTED), "iptables-restore", text)
        log.debug(
            "firewall.apply.complete",
            ops=len(script),
            duration_ms=round((time.perf_counter() - start) * 1000, 2),
        )

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
            await process.wait()
            return subprocess.CompletedProcess(
                process.args, process.returncode, out.get("stdout", b""), out.get("stderr", b"")
            )
        await _discard(process)  # timed out
        return None

    def _result(
        self, result: subprocess.CompletedProcess[bytes] | None, what: str, script: str = ""
    ) -> bytes:
        """The output of a completed process, or FirewallApply for a timeout or a failure."""
        if result is None:
            self._converged = False
            raise FirewallApply(f"{what} timed out after {self.timeout} s", stderr="")
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
