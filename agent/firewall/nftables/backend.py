"""The nftables backend: `agent.firewall.base.Firewall` over one `inet netagent` table.

Theory of operation. Each `Policy` is rendered into the table's `State` (`render.render`;
on the request path `render.Incremental`, which touches only the networks that changed, so a
create costs the same among 1,000 networks as among one); `apply` sends only
`script.diff(applied, new)` as one transaction, so a network create among 1,000 sends its own
two to five set elements, and the kernel is never re-read on the hot path. `setup`
and `repair` read the table once (`nft list table`), compare (`script.drift`) and, when it
differs, converge with `script.full` in one transaction: the table is flushed and refilled
atomically, so traffic never sees it half-written. A restart that finds the table as it should
be rewrites nothing.

If a diff is refused (someone deleted an element the diff deletes again), the backend converges
from the kernel's listing instead, once; if that fails too, `FirewallApply` is raised and the
kernel holds what it held (each transaction is all or nothing).

Drift: `foreign` flags any commit touching the agent's table, or iptables' and ip6tables' filter
tables (where the marked FORWARD accept lives, `coexist`), that the transport did not make.
"""

from __future__ import annotations

import time

import trio

from agent.core.errors import FirewallApply
from agent.core.policy import Policy
from agent.firewall.conntrack import PortEffects
from agent.firewall.monitor import NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6, NftChange
from agent.firewall.nftables import coexist, script
from agent.firewall.nftables.render import FAMILY, TABLE, Incremental, State, render
from agent.firewall.nftables.transport import LibNftables, NftError, Transport
from agent.firewall.nftables.transport import create as create_transport
from agent.log import get_logger

log = get_logger("agent.firewall.nftables")

WATCHED_TABLES = frozenset(
    {(NFPROTO_INET, TABLE), (NFPROTO_IPV4, "filter"), (NFPROTO_IPV6, "filter")}
)
TIMEOUT = 30.0


class NftablesFirewall:
    """The `Firewall` of the `inet netagent` table.

    Args:
        nft: runs scripts (libnftables in process by default, or the `nft` tool).
        coexistence: keep the marked accept in iptables FORWARD and remove the iptables
            backend's leftovers (off only in unit tests without iptables).
    """

    name = "nftables"

    def __init__(self, nft: Transport, *, coexistence: bool = True) -> None:
        self.nft = nft
        self.coexistence = coexistence
        self.applied: State | None = None  # None: the kernel's table is not known to match
        self._ports = PortEffects()
        self._render = Incremental()  # `render`, at the cost of what changed only
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def default(cls) -> NftablesFirewall:
        """The backend over libnftables in process.

        Raises:
            FirewallApply: libnftables.so.1 cannot be loaded.
        """
        try:
            return cls(create_transport("libnftables"))
        except NftError as exc:
            raise FirewallApply(f"the nftables backend needs libnftables: {exc}") from exc

    @staticmethod
    def usable(soname: str = "libnftables.so.1") -> bool:
        """Whether libnftables loads and the kernel's nf_tables answers it (`--firewall auto`)."""
        try:
            nft = LibNftables(soname)
        except NftError:
            return False
        try:
            nft.run("list tables")
        except NftError:
            return False
        finally:
            nft.close()
        return True

    async def _run(self, lines: list[str]) -> str:
        """One transaction (or a listing), in a worker thread, never cancelled halfway."""
        text = "\n".join(lines) + "\n"
        start = time.perf_counter()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(TIMEOUT) as scope:
                try:
                    out = await trio.to_thread.run_sync(self.nft.run, text, limiter=self._limiter)
                except NftError as exc:
                    line = str(exc).splitlines()[1] if "\n" in str(exc) else ""
                    raise FirewallApply(
                        f"nft refused the transaction: {exc}", stderr=str(exc), line=line
                    ) from exc
            if scope.cancelled_caught:
                raise FirewallApply("nft did not answer in time", stderr="timeout")
        log.debug(
            "firewall.apply.complete",
            commands=len(lines),
            duration_ms=round((time.perf_counter() - start) * 1000, 2),
        )
        return out

    async def observe(self) -> script.Listing:
        """The table as the kernel holds it (one listing; not for the hot path)."""
        try:
            text = await self._run([f"list table {FAMILY} {TABLE}"])
        except FirewallApply:
            text = ""  # no table
        return script.parse_listing(text)

    async def _converge(self, new: State) -> list[str]:
        self.applied = None
        seen = await self.observe()
        problems = script.drift(seen, new)
        if problems:
            stale = script.stale(seen.chains, new)
            await self._run(script.full(new, stale, script.stale_sets(seen)))
        self.applied = new
        return problems

    async def setup(self, policy: Policy) -> None:
        """Converge the table from whatever the kernel holds; remove the iptables backend's
        leftovers; make sure iptables FORWARD accepts what the table accepts.

        Raises:
            FirewallApply: the table could not be written.
        """
        new = render(policy)
        async with self._lock:
            await self._converge(new)
            if self.coexistence:
                await trio.to_thread.run_sync(coexist.retire_iptables)
                await trio.to_thread.run_sync(coexist.ensure_forward_accept)
            await self._ports.applied(policy)

    async def apply(self, policy: Policy) -> int:
        """Send only what changed since the last policy; returns the number of commands.

        Raises:
            FirewallApply: the transaction (and the converge tried after it) failed; nothing
                changed.
        """
        new = self._render.render(policy)
        async with self._lock:
            if self.applied is None:
                count = len(await self._converge(new))
            else:
                lines = script.diff(self.applied, new)
                count = len(lines)
                if lines:
                    try:
                        await self._run(lines)
                    except FirewallApply as exc:
                        log.warning("firewall.diff.refused", error=exc.message)
                        await self._converge(new)
                self.applied = new
            await self._ports.applied(policy)
            return count

    async def repair(self, policy: Policy) -> list[str]:
        """Compare the table with `policy` and converge what drifted; the marked FORWARD
        accept is put back too. Returns one line per problem."""
        new = render(policy)
        async with self._lock:
            problems = await self._converge(new)
            if self.coexistence:
                problems += await trio.to_thread.run_sync(coexist.ensure_forward_accept)
            return problems

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background: transactions run in the caller's turn."""
        task_status.started()
        await trio.sleep_forever()

    def foreign(self, change: NftChange) -> bool:
        """Whether `change` touched the agent's table or iptables' filter tables and was not
        committed by this backend's transport."""
        return change.pid not in self.nft.pids and not WATCHED_TABLES.isdisjoint(change.tables)

    def bridge_recreated(self, bridge: str) -> None:
        """A bridge came back: route_localnet again if it has IPv4 ports (the table matches
        by name, so its rules need nothing)."""
        self._ports.bridge_recreated(bridge)

    def text(self) -> str:
        """The table as `nft list table inet netagent` prints it."""
        return script.listing(self.applied or State())

    def rule_count(self) -> int:
        """Rules in the agent's chains plus elements in its sets and maps."""
        state = self.applied or State()
        return state.rule_count() + sum(len(e) for e in state.elements.values())
