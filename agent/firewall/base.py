"""The firewall driver boundary: the `Firewall` protocol every backend implements.

Theory of operation. The service decides *what* to enforce, as a backend-neutral
`agent.core.policy.Policy` (isolation, masquerade, published ports); a backend decides *how*
and owns everything about it: its rules' layout, its transactions, dual stack, how it checks
the kernel for drift. `agent.firewall.create` picks one by name (`agentd --firewall`), as
netavark's FirewallDriver does. The service and the reconciler use nothing but this protocol.

Every change is all or nothing: when `apply` raises, the kernel holds the previous policy's
rules (or the backend knows it does not and converges at its next call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from agent.core.policy import Policy

if TYPE_CHECKING:
    from agent.firewall.monitor import NftChange


class Firewall(Protocol):
    """A firewall backend (see the module docstring)."""

    #: the name `agentd --firewall` knows it by, shown by `agentctl info`
    name: str

    async def setup(self, policy: Policy) -> None:
        """Converge the kernel to `policy` from whatever it holds (start-up): the agent's own
        rules are rewritten, foreign ones never touched. FirewallApply on failure."""
        ...

    async def apply(self, policy: Policy) -> int:
        """Make the kernel hold `policy`, changing only what differs from the last one applied;
        returns the number of changes. FirewallApply on failure, with nothing changed."""
        ...

    async def repair(self, policy: Policy) -> list[str]:
        """Check the kernel against `policy` (not on the hot path) and converge what drifted;
        returns one line per problem found (empty: nothing had drifted)."""
        ...

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The backend's background work (helper processes, reaping), until cancelled."""
        ...

    def foreign(self, change: NftChange) -> bool:
        """Whether a committed nf_tables transaction may have changed this backend's rules and
        was not made by the backend itself (then the reconciler runs `repair`)."""
        ...

    def bridge_recreated(self, bridge: str) -> None:
        """A bridge came back (repair): restore the per-device settings the rules rely on."""
        ...

    def text(self) -> str:
        """The agent's ruleset in the backend's own syntax (`agentctl ruleset`)."""
        ...

    def rule_count(self) -> int:
        """Rules the agent holds (outside the built-in hooks)."""
        ...
