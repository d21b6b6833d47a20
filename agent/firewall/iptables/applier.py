"""The per-family iptables applier: render -> serialise (_fast) -> `Restorer.restore`.

Theory of operation. `applied` is the ruleset the kernel holds, as last applied; the kernel is
never re-listed on the hot path (`iptables-save` costs ~100 ms at 10k rules). `setup` converges
from anything at start-up: ONE `iptables-save` finds our chains, the built-in jumps and
NETAGENT-USER, then ONE restore of `transaction.full` rewrites every agent chain. `sync`
restores only `transaction.diff(applied, desired)`.

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

Error handling: every failure is a `FirewallApply` with `line` (the offending script line),
`line_number`, `stderr`, `rolled_back`. Cancellation never lands inside a restore: each
process runs shielded, bounded by its timeout (see `agent.firewall.iptables.restore`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import trio

from agent import accel
from agent.core import policy
from agent.core.errors import FirewallApply
from agent.core.model import Endpoint, Network, PortMapping
from agent.firewall import conntrack
from agent.firewall.iptables import rules, transaction
from agent.firewall.iptables.restore import Restorer, RestoreTimeout, sections
from agent.firewall.iptables.save import Observed, drift, parse_save
from agent.log import get_logger

log = get_logger("agent.firewall")


def _merge(old: rules.Ruleset, new: rules.Ruleset, tables: Iterable[str]) -> rules.Ruleset:
    """`old` with `tables` taken from `new`: what the kernel holds after a partial commit."""
    taken = set(tables)
    merged = {t: c for t, c in old.tables.items() if t not in taken}
    merged.update({t: c for t, c in new.tables.items() if t in taken})
    heads = {k: h for k, h in old.heads.items() if k[0] not in taken}
    heads.update({k: h for k, h in new.heads.items() if k[0] in taken})
    return rules.Ruleset(merged, heads)


class IptablesFirewall:
    """Programs the agent's iptables chains of one family; one writer at a time.

    Args:
        restorer: runs the family's iptables-restore and iptables-save (a new one for
            iptables, or ip6tables with `family=6`, if None).
        serialize: `Script -> str`; the Cython accelerator when built.
        family: 4 (iptables) or 6 (ip6tables: the policy's `v6`).
    """

    def __init__(
        self,
        restorer: Restorer | None = None,
        *,
        serialize: Callable[[transaction.Script], str] = accel.serialize.serialize,
        family: int = 4,
    ) -> None:
        if restorer is None:
            ip = "ip6" if family == 6 else "ip"
            restorer = Restorer(f"{ip}tables-restore", f"{ip}tables-save")
        self.restorer = restorer
        self.family = family
        self.serialize = serialize
        self.applied: rules.Ruleset = rules.EMPTY
        self._converged = False
        self._lock = trio.Lock()
        self.own_pids = restorer.own_pids
        self._endpoints: tuple[Endpoint, ...] = ()
        self._published: set[tuple[str, str, PortMapping]] = set()  # (bridge, ip, mapping)

    def _desired(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None
    ) -> tuple[rules.Ruleset, list[Network], tuple[Endpoint, ...]]:
        networks = list(networks)
        eps = self._endpoints if endpoints is None else tuple(endpoints)
        family = policy.build(networks, eps).family(self.family)
        return rules.render(family), networks, eps

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
            if policy.mapped_for(m, self.family)
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
                script = transaction.diff(self.applied, new)
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
        return self.serialize(transaction.full(self.applied))

    def rule_count(self) -> int:
        """Rules in the agent's chains (built-in jumps and NETAGENT-USER not counted)."""
        return self.applied.rule_count()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The restore processes' background work (`Restorer.serve`), until cancelled."""
        await self.restorer.serve(task_status=task_status)

    async def repair(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> list[str]:
        """Compare the kernel with the desired ruleset (one iptables-save) and converge it if
        anything differs; returns what was repaired (empty when nothing had drifted)."""
        new, _, _ = self._desired(networks, endpoints)
        async with self._lock:
            seen = await self.observe()
            problems = drift(seen, new)
            if problems:
                await self._converge(new)
            return problems

    async def observe(self) -> Observed:
        """One `iptables-save`, parsed: for drift checks (`observe().ruleset() != applied`).

        Not for the hot path: iptables-save takes ~100 ms at 10k rules.
        """
        try:
            return parse_save(await self.restorer.save())
        except RestoreTimeout:
            self._converged = False
            raise

    async def _converge(self, new: rules.Ruleset) -> int:
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

    async def _apply_diff(self, script: transaction.Script, new: rules.Ruleset) -> None:
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

    async def _rollback(self, partial: rules.Ruleset, exc: FirewallApply) -> None:
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
