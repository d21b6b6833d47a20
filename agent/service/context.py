"""What every part of the service shares: the topology, the shells, the locks, the bus.

Each part (`networks`, `endpoints`, `ports`, `sandboxes`) holds the one `Shared` and calls the
others' public methods only. The helpers here are the steps several parts take: applying the
firewall policy of the topology, and undoing steps after a failure while keeping its error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence

from agent.core import policy
from agent.core.model import Endpoint, Network
from agent.core.pools import Pool
from agent.core.topology import Topology
from agent.firewall.base import Firewall
from agent.kernel.base import Kernel, Namespaces
from agent.log import get_logger
from agent.service.events import EventBus
from agent.service.locks import KeyedLocks, TopologyLock
from agent.service.reaper import Reaper
from agent.store.sqlite import Store

log = get_logger("agent.service")


class Shared:
    """The state and shells of one agentd, shared by the service's parts.

    Resource handling:
        `reaper.serve` must run (the daemon starts it) for retired links to be deleted.
    """

    def __init__(
        self,
        *,
        topo: Topology,
        kernel: Kernel,
        firewall: Firewall,
        namespaces: Namespaces,
        store: Store,
        pools: Sequence[Pool],
        bus: EventBus | None = None,
    ) -> None:
        self.topo = topo
        self.kernel = kernel
        self.firewall = firewall
        self.ns = namespaces
        self.store = store
        self.pools = tuple(pools)
        self.bus = bus or EventBus()
        self.lock = TopologyLock()
        self.netns_locks = KeyedLocks()
        self.reaper = Reaper(kernel, topo.release_addresses)
        self.policy_builder = policy.Builder()  # policy.build, kept from one call to the next

    def policy(
        self,
        networks: Iterable[Network] | None = None,
        endpoints: Iterable[Endpoint] | None = None,
    ) -> policy.Policy:
        """The firewall policy of `networks` (default: the topology's) and of the ports the
        joined `endpoints` publish (default: every joined endpoint with ports)."""
        nets = self.topo.networks.values() if networks is None else networks
        eps = self.topo.with_ports() if endpoints is None else endpoints
        return self.policy_builder.build(nets, [e for e in eps if e.joined])

    async def apply_firewall(
        self,
        networks: Iterable[Network] | None = None,
        endpoints: Iterable[Endpoint] | None = None,
    ) -> None:
        """Make the firewall hold `policy(networks, endpoints)` (one transaction)."""
        await self.firewall.apply(self.policy(networks, endpoints))


async def undo(error: BaseException, steps: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Run the rollback `steps` of a failed request, in order, each even if one before failed.

    Error handling: the request's own `error` is what the caller re-raises; a step that fails
    only adds a note to it (and is logged), so the first cause is never hidden.
    """
    for step in steps:
        try:
            await step()
        except Exception as problem:
            name = getattr(step, "__name__", "rollback")
            error.add_note(f"rollback step {name} failed too: {problem}")
            log.error("request.rollback.failed", step=name, error=str(problem))
