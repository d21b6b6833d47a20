"""One family's iptables chains: rendered ruleset in, serialise (_fast), `Restorer.restore`.

Theory of operation. `applied` is the ruleset the kernel holds, as last applied; the kernel is
never re-listed on the hot path (`iptables-save` costs ~100 ms at 10k rules). `setup` converges
from anything at start-up: ONE `iptables-save` finds our chains, the built-in jumps and
NETAGENT-USER, then ONE restore of `transaction.full` rewrites every agent chain. `apply`
restores only `transaction.diff(applied, new)`.

iptables-restore commits each `*table` section separately (measured with 1.8.9 nf_tables: a
failure in `*nat` leaves the `*filter` section applied). A failed transaction is therefore
mapped back to the table it failed in; sections committed before it are undone with the
inverse diff, so `applied` stays true. If that rollback fails too, or the outcome is unknown
(timeout, no line number), the next `apply` converges with a full `setup` instead.

The applier knows rulesets only: the backend (`agent.firewall.iptables.backend`) renders them
from the policy, drives one applier per family and owns everything else (dual stack, published
ports' side effects, drift notifications).

Error handling: every failure is a `FirewallApply` with `line` (the offending script line),
`line_number`, `stderr`, `rolled_back`. Cancellation never lands inside a restore: each
process runs shielded, bounded by its timeout (see `agent.firewall.iptables.restore`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import trio

from agent import accel
from agent.core.errors import FirewallApply
from agent.firewall.iptables import transaction
from agent.firewall.iptables.restore import Restorer, RestoreTimeout, sections
from agent.firewall.iptables.rules import EMPTY, Ruleset
from agent.firewall.iptables.save import Observed, drift, parse_save
from agent.log import get_logger

log = get_logger("agent.firewall")


def _merge(old: Ruleset, new: Ruleset, tables: Iterable[str]) -> Ruleset:
    """`old` with `tables` taken from `new`: what the kernel holds after a partial commit."""
    taken = set(tables)
    merged = {t: c for t, c in old.tables.items() if t not in taken}
    merged.update({t: c for t, c in new.tables.items() if t in taken})
    heads = {k: h for k, h in old.heads.items() if k[0] not in taken}
    heads.update({k: h for k, h in new.heads.items() if k[0] in taken})
    return Ruleset(merged, heads)


class FamilyApplier:
    """Keeps one family's agent chains in the kernel equal to a ruleset; one writer at a time.

    Args:
        restorer: runs the family's iptables-restore and iptables-save (iptables if None;
            `Restorer("ip6tables-restore", "ip6tables-save")` for IPv6).
        serialize: `Script -> str`; the Cython accelerator when built.
    """

    def __init__(
        self,
        restorer: Restorer | None = None,
        *,
        serialize: Callable[[transaction.Script], str] = accel.serialize.serialize,
    ) -> None:
        self.restorer = Restorer() if restorer is None else restorer
        self.serialize = serialize
        self.applied: Ruleset = EMPTY
        self._converged = False
        self._lock = trio.Lock()

    async def setup(self, new: Ruleset) -> int:
        """Converge the kernel to `new` from whatever it holds (start-up); returns the ops run.

        Foreign rules and chains are untouched; NETAGENT-USER is created only if missing; stale
        NETAGENT-* chains are flushed and deleted (only flushed if a foreign rule jumps to them).

        Raises:
            FirewallApply: iptables-save or iptables-restore failed; `applied` is unchanged.
        """
        async with self._lock:
            return await self._converge(new)

    async def apply(self, new: Ruleset) -> int:
        """Apply the difference between `applied` and `new`; returns its op count.

        Raises:
            FirewallApply: the transaction failed; `applied` still matches the kernel (rolled
                back), or the next call converges with a full setup.
        """
        async with self._lock:
            if not self._converged:
                return await self._converge(new)
            script = transaction.diff(self.applied, new)
            if script:
                await self._apply_diff(script, new)
                self.applied = new
            return len(script)

    async def repair(self, new: Ruleset) -> list[str]:
        """Compare the kernel with `new` (one iptables-save) and converge it if anything
        differs; returns what was repaired (empty when nothing had drifted)."""
        async with self._lock:
            seen = await self.observe()
            problems = drift(seen, new)
            if problems:
                await self._converge(new)
            return problems

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The restore processes' background work (`Restorer.serve`), until cancelled."""
        await self.restorer.serve(task_status=task_status)

    def text(self) -> str:
        """The ruleset as iptables-restore would be fed it from scratch (`agentctl ruleset`)."""
        return self.serialize(transaction.full(self.applied))

    def rule_count(self) -> int:
        """Rules in the agent's chains (built-in jumps and NETAGENT-USER not counted)."""
        return self.applied.rule_count()

    async def observe(self) -> Observed:
        """One `iptables-save`, parsed: for drift checks (`observe().ruleset() != applied`).

        Not for the hot path: iptables-save takes ~100 ms at 10k rules.
        """
        try:
            return parse_save(await self.restorer.save())
        except RestoreTimeout:
            self._converged = False
            raise

    async def _converge(self, new: Ruleset) -> int:
        self._converged = False
        seen = await self.observe()
        stale = transaction.stale(seen.chains, new)
        if (
            not stale
            and seen.user_chain_exists()
            and not seen.missing_jumps()
            and seen.ruleset() == new
        ):  # already converged (a restart): rewrite nothing
            self.applied = new
            self._converged = True
            return 0
        script = transaction.full(
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

    async def _apply_diff(self, script: transaction.Script, new: Ruleset) -> None:
        try:
            await self._restore(script)
        except FirewallApply as exc:
            number = exc.data.get("line_number")
            if number is None:
                self._converged = False
                raise
            text = self.serialize(script)
            committed = [t for t, commit in sections(text) if commit < number]
            if committed:
                await self._rollback(_merge(self.applied, new, committed), exc)
            exc.data["rolled_back"] = True
            raise

    async def _rollback(self, partial: Ruleset, exc: FirewallApply) -> None:
        """Undo the sections that committed before the failing one."""
        try:
            await self._restore(transaction.diff(partial, self.applied))
        except FirewallApply as again:
            log.error("firewall.rollback.failed", stderr=again.data.get("stderr"))
            self.applied = partial
            self._converged = False
            exc.data["rolled_back"] = False
            raise exc from again
        log.warning("firewall.rollback.complete", line=exc.data.get("line"))

    async def _restore(self, script: transaction.Script) -> None:
        text = self.serialize(script)
        start = time.perf_counter()
        try:
            await self.restorer.restore(text)
        except RestoreTimeout:
            self._converged = False
            raise
        log.debug(
            "firewall.apply.complete",
            ops=len(script),
            duration_ms=round((time.perf_counter() - start) * 1000, 2),
        )
