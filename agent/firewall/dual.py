"""Dual stack firewall: the iptables applier and its ip6tables twin behind one interface.

Theory of operation. `DualFirewall` offers what the service and the reconciler use of an
`IptablesFirewall` (`setup`, `sync`, `repair`, `text`, `rule_count`, `own_pids`,
`bridge_recreated`) and drives two of them: IPv4 (`rules.render(..., family=4)`, every network)
and IPv6 (`family=6`, dual-stack networks only). IPv4 goes first; if the IPv6 step then
fails, IPv4 is put back to what it was before, so a request still lands whole or not at all.

IPv6 is optional: if ip6tables cannot run at start-up (not installed, IPv6 disabled in the
kernel) the agent works IPv4-only and a dual-stack network is refused with `FirewallApply`
naming the reason. Both appliers share one `own_pids` record, so the drift monitor ignores
the agent's own ip6tables commits too.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from agent.core.errors import FirewallApply
from agent.core.model import Endpoint, Network
from agent.firewall.iptables.applier import IptablesFirewall
from agent.log import get_logger

log = get_logger("agent.firewall.dual")


class DualFirewall:
    """One IPv4 and one (optional) IPv6 `IptablesFirewall`, applied in that order."""

    def __init__(self, v4: IptablesFirewall, v6: IptablesFirewall | None) -> None:
        self.v4 = v4
        self.v6 = v6
        self.v6_error = "" if v6 is not None else "ip6tables is not configured"
        if v6 is not None:
            v6.restorer.own_pids = v6.own_pids = v4.own_pids
        self.own_pids = v4.own_pids
        self._networks: list[Network] = []

    @classmethod
    def default(cls) -> DualFirewall:
        """iptables-restore/-save and ip6tables-restore/-save, found through PATH."""
        return cls(IptablesFirewall(), IptablesFirewall(family=6))

    def _need_v6(self, networks: list[Network]) -> IptablesFirewall | None:
        if self.v6 is None and any(n.ipv6 for n in networks):
            raise FirewallApply(
                f"IPv6 networks need ip6tables, which is unavailable: {self.v6_error}",
                stderr=self.v6_error,
            )
        return self.v6

    async def setup(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> None:
        """Converge both families; an IPv6 failure here only disables IPv6 (logged)."""
        nets = list(networks)
        eps = None if endpoints is None else list(endpoints)
        await self.v4.setup(nets, eps)
        if self.v6 is not None:
            try:
                await self.v6.setup(nets, eps)
            except FirewallApply as exc:
                if any(n.ipv6 for n in nets):
                    raise
                log.warning("firewall.ipv6.unavailable", error=exc.message)
                self.v6, self.v6_error = None, exc.message
        self._networks = nets

    async def sync(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> int:
        """IPv4 then IPv6; if IPv6 fails, IPv4 is restored and the error raised."""
        nets = list(networks)
        eps = None if endpoints is None else list(endpoints)
        v6 = self._need_v6(nets)
        before = (self._networks, self.v4._endpoints)
        count = await self.v4.sync(nets, eps)
        if v6 is not None:
            try:
                count += await v6.sync(nets, eps)
            except BaseException:
                await self.v4.sync(*before)
                raise
        self._networks = nets
        return count

    async def repair(
        self, networks: Iterable[Network], endpoints: Iterable[Endpoint] | None = None
    ) -> list[str]:
        nets = list(networks)
        eps = None if endpoints is None else list(endpoints)
        problems = await self.v4.repair(nets, eps)
        if self.v6 is not None:
            problems += [f"ip6 {p}" for p in await self.v6.repair(nets, eps)]
        return problems

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        """Spare and exiting restore processes of each family (`IptablesFirewall.serve`)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.v4.serve)
            if self.v6 is not None:
                await nursery.start(self.v6.serve)
            task_status.started()

    def bridge_recreated(self, bridge: str) -> None:
        self.v4.bridge_recreated(bridge)

    def text(self) -> str:
        """The IPv4 ruleset, then (if any) the IPv6 one after a `# ip6tables-restore` line."""
        text = self.v4.text()
        if self.v6 is not None and self.v6.applied.rule_count():
            text += "# ip6tables-restore\n" + self.v6.text()
        return text

    def rule_count(self) -> int:
        return self.v4.rule_count() + (self.v6.rule_count() if self.v6 is not None else 0)
