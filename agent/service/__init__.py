"""The service: every change to the topology goes through it.

Theory of operation. A request arrives as a core value (`plan.NetworkSpec`,
`plan.EndpointSpec`, port mappings) from any front end; the core decides it against the
in-memory topology, then the service applies it to the kernel (links), the firewall (through
the `Firewall` protocol) and the store (sqlite), each step undone if a later one fails, so a
request lands whole or changes nothing. Mutations take the topology lock (`locks`): endpoint
requests in shared mode with a per-namespace lock, everything network-wide exclusively; reads
answer from memory. A disconnect only cuts its veth off and leaves the slow kernel deletion to
the reaper (`reaper`), which deletes many at once.

The parts, by composition (each holds the one `Shared` and calls the others' public methods):

    networks    create, list, inspect, remove, prune
    endpoints   connect / reserve + attach, disconnect, remove, list; release (building block)
    ports       publish, unpublish on existing endpoints
    sandboxes   run, rm (agent-managed named namespaces)
    adopt       start-up: the topology from the store, the kernel's links converged to it
    reconcile   live repairs from kernel and nftables events, and `reconcile` on demand
    reaper      batched deletion of retired links
    locks, events, context   the lock, the event bus, what the parts share
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.core import pools
from agent.core.topology import Topology
from agent.firewall.base import Firewall
from agent.kernel.base import Kernel, Namespaces
from agent.service.context import Shared
from agent.service.endpoints import Endpoints
from agent.service.events import EventBus
from agent.service.locks import TopologyLock
from agent.service.networks import Networks
from agent.service.ports import Ports
from agent.service.reaper import Reaper
from agent.service.sandboxes import Sandboxes
from agent.store.sqlite import Store

__all__ = ["Service"]


class Service:
    """The service's parts over one shared state (see the module docstring)."""

    def __init__(
        self,
        *,
        topo: Topology,
        kernel: Kernel,
        firewall: Firewall,
        namespaces: Namespaces,
        store: Store,
        pools: Sequence[pools.Pool] = pools.DEFAULT_POOLS,
        bus: EventBus | None = None,
    ) -> None:
        self.shared = Shared(
            topo=topo, kernel=kernel, firewall=firewall, namespaces=namespaces, store=store,
            pools=pools, bus=bus,
        )  # fmt: skip
        self.endpoints = Endpoints(self.shared)
        self.networks = Networks(self.shared, self.endpoints)
        self.ports = Ports(self.shared)
        self.sandboxes = Sandboxes(self.shared, self.endpoints)

    # the shared state, for the daemon, the handlers and the reconciler
    @property
    def topo(self) -> Topology:
        return self.shared.topo

    @property
    def bus(self) -> EventBus:
        return self.shared.bus

    @property
    def reaper(self) -> Reaper:
        return self.shared.reaper

    @property
    def lock(self) -> TopologyLock:
        return self.shared.lock
