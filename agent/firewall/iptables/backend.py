"""The iptables backend: `agent.firewall.base.Firewall` over iptables and ip6tables.

Theory of operation. Each `Policy` is rendered family by family (`rules.render`: IPv4 with
every network, IPv6 with the dual-stack ones) and handed to that family's `FamilyApplier`,
which restores only the difference from what it applied last. IPv4 goes first; if the IPv6
step then fails, IPv4 is put back to the last policy applied, so a change still lands whole or
not at all. Once both families hold the policy, `conntrack.PortEffects` sets route_localnet on
the bridges that gained IPv4 ports and flushes the flows of every forward that went away.

IPv6 is optional: if ip6tables cannot run at start-up (not installed, IPv6 disabled in the
kernel) and no network is dual stack, the backend works IPv4-only and refuses a policy with
IPv6 networks with `FirewallApply` naming the reason.

Drift: with the nf_tables flavour of iptables, every change (the agent's own included) is an
nf_tables transaction the monitor reports (`agent.firewall.monitor`). Both families' restore
processes record their pids in one `own_pids`, so `foreign` tells the agent's commits from
anyone else's; only the ip and ip6 filter and nat tables hold the agent's rules.
"""

from __future__ import annotations

import collections
from collections.abc import Container
from typing import TYPE_CHECKING, Protocol

import trio

from agent.core.errors import FirewallApply
from agent.core.policy import EMPTY, Policy
from agent.firewall.conntrack import PortEffects
from agent.firewall.iptables import rules
from agent.firewall.iptables.applier import FamilyApplier
from agent.firewall.iptables.restore import OWN_PIDS, Restorer
from agent.firewall.nftables import coexist
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.firewall.monitor import NftChange

log = get_logger("agent.firewall.iptables")

NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
#: (nfproto, table) of the nf_tables tables iptables and ip6tables keep the agent's rules in.
WATCHED_TABLES = frozenset(
    (family, table) for family in (NFPROTO_IPV4, NFPROTO_IPV6) for table in ("filter", "nat")
)


class Applier(Protocol):
    """What the backend needs of one family's applier (`FamilyApplier`)."""

    async def setup(self, new: rules.Ruleset) -> int: ...

    async def apply(self, new: rules.Ruleset) -> int: ...

    async def repair(self, new: rules.Ruleset) -> list[str]: ...

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def text(self) -> str: ...

    def rule_count(self) -> int: ...


class IptablesFirewall:
    """The `Firewall` of iptables (IPv4) and ip6tables (IPv6), applied in that order.

    Args:
        v4: the IPv4 applier.
        v6: the IPv6 applier; None: IPv4 only (a policy with IPv6 networks is refused).
        own_pids: the pids of every process the appliers start (see `foreign`).
    """

    name = "iptables"

    def __init__(self, v4: Applier, v6: Applier | None, *, own_pids: Container[int] = ()) -> None:
        self.v4 = v4
        self.v6 = v6
        self.v6_error = "" if v6 is not None else "ip6tables is not configured"
        self.own_pids = own_pids
        self.retire_nftables = False  # `default()`: remove the nftables backend's table
        self._policy = EMPTY  # the last policy both families hold
        self._ports = PortEffects()
        self._lock = trio.Lock()

    @classmethod
    def default(cls) -> IptablesFirewall:
        """iptables-restore/-save and ip6tables-restore/-save, found through PATH."""
        own: collections.deque[int] = collections.deque(maxlen=OWN_PIDS)
        v4 = FamilyApplier(Restorer("iptables-restore", "iptables-save", own_pids=own))
        v6 = FamilyApplier(Restorer("ip6tables-restore", "ip6tables-save", own_pids=own))
        backend = cls(v4, v6, own_pids=own)
        backend.retire_nftables = True
        return backend

    @property
    def policy(self) -> Policy:
        """The last policy applied to both families (the one IPv4 is put back to)."""
        return self._policy

    def _need_v6(self, policy: Policy) -> Applier | None:
        if self.v6 is None and policy.needs_ipv6:
            raise FirewallApply(
                f"IPv6 networks need ip6tables, which is unavailable: {self.v6_error}",
                stderr=self.v6_error,
            )
        return self.v6

    async def setup(self, policy: Policy) -> None:
        """Converge both families; an IPv6 failure only disables IPv6 (logged) when no
        network needs it.

        Raises:
            FirewallApply: IPv4 failed, or IPv6 failed (or is off) with IPv6 networks.
        """
        self._need_v6(policy)
        new4, new6 = rules.render(policy.v4), rules.render(policy.v6)
        async with self._lock:
            if self.retire_nftables:  # switching from the nftables backend leaves nothing
                await trio.to_thread.run_sync(coexist.retire_nftables)
            await self.v4.setup(new4)
            if self.v6 is not None:
                try:
                    await self.v6.setup(new6)
                except FirewallApply as exc:
                    if policy.needs_ipv6:
                        raise
                    log.warning("firewall.ipv6.unavailable", error=exc.message)
                    self.v6, self.v6_error = None, exc.message
            await self._ports.applied(policy)
            self._policy = policy

    async def apply(self, policy: Policy) -> int:
        """IPv4 then IPv6, each only what changed; if IPv6 fails, IPv4 is restored to the last
        policy and the error raised. Returns the number of iptables operations.

        Raises:
            FirewallApply: either family failed (nothing changed), or IPv6 is off and the
                policy has IPv6 networks (nothing tried).
        """
        v6 = self._need_v6(policy)
        new4 = rules.render(policy.v4)
        new6 = None if v6 is None else rules.render(policy.v6)
        async with self._lock:
            count = await self.v4.apply(new4)
            if v6 is not None and new6 is not None:
                try:
                    count += await v6.apply(new6)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._restore_v4()
                    raise
            await self._ports.applied(policy)
            self._policy = policy
            return count

    async def _restore_v4(self) -> None:
        """Put IPv4 back to the last policy (IPv6 failed); a failure is logged, and the IPv4
        applier converges at its next call."""
        try:
            await self.v4.apply(rules.render(self._policy.v4))
        except FirewallApply as exc:
            log.error("firewall.ipv4.restore.failed", error=exc.message)

    async def repair(self, policy: Policy) -> list[str]:
        """Each family's drift check (one iptables-save each); IPv6 problems say `ip6`."""
        new4, new6 = rules.render(policy.v4), rules.render(policy.v6)
        async with self._lock:
            problems = await self.v4.repair(new4)
            if self.v6 is not None:
                problems += [f"ip6 {p}" for p in await self.v6.repair(new6)]
            return problems

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Spare and exiting restore processes of each family (`Restorer.serve`)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.v4.serve)
            if self.v6 is not None:
                await nursery.start(self.v6.serve)
            task_status.started()

    def foreign(self, change: NftChange) -> bool:
        """Whether `change` touched an ip/ip6 filter or nat table and is not the agent's own."""
        return change.pid not in self.own_pids and not WATCHED_TABLES.isdisjoint(change.tables)

    def bridge_recreated(self, bridge: str) -> None:
        """A bridge came back: route_localnet again if it has IPv4 ports."""
        self._ports.bridge_recreated(bridge)

    def text(self) -> str:
        """The IPv4 ruleset, then (if any) the IPv6 one after a `# ip6tables-restore` line."""
        text = self.v4.text()
        if self.v6 is not None and self.v6.rule_count():
            text += "# ip6tables-restore\n" + self.v6.text()
        return text

    def rule_count(self) -> int:
        """Rules in the agent's chains, both families."""
        return self.v4.rule_count() + (self.v6.rule_count() if self.v6 is not None else 0)
