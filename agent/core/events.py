"""What the agent tells subscribers happened (pure values; the bus is `agent.service.events`).

type/action: network created|removed; endpoint connected|reserved|disconnected|released;
repair repaired (what the agent fixed by itself: `attributes` says what and why).
"""

from __future__ import annotations

import msgspec


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """One notification, like a `docker events` line."""

    seq: int  # strictly increasing per agentd process
    time: float
    type: str
    action: str
    id: str  # the network's or endpoint's id; for repairs, the repaired object's
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
