"""The kernel worker's jobs: their names, their lanes, the shapes of their arguments, the frame.

Theory of operation: agentd (`agent.kernel.client`) and the worker process
(`agent.kernel.worker`, running `agent.kernel.ops`) agree on this module only. agentd sends a
`Job` by name with plain arguments; the worker runs the function its table
(`agent.kernel.ops.JOBS`) gives for that name, in the job's lane, and answers. Neither side
imports the other: tests/shell/test_worker.py checks that the table covers every `Job` and
accepts the arguments the client sends.

Arguments cross as builtins: a `Bridge` or `Attachment` is sent as the plain tuple of its
fields (`msgspec.structs.astuple`), read back as `BridgeFields`/`AttachFields`. Unpickling the
Struct itself would run its validation again (~17 us) in the owner thread, the churn
bottleneck, for values agentd validated already.

A frame is a 4-byte length (`FRAME`) and a pickle: a request is (id, job name, args), an
answer (id, ok, result or exception). A job bound by a request deadline
(`agent.core.deadline`) is sent as (id, job name, args, at), `at` on CLOCK_MONOTONIC: before
beginning it the worker sends (id, None, None), "begun", and waits for nothing
(`agent.kernel.connection` says why the two sides cannot cross).
"""

from __future__ import annotations

import struct
from enum import StrEnum
from typing import NamedTuple


class Job(StrEnum):
    """Every job the worker runs (the value is what crosses the socket)."""

    OPEN = "open"
    CLOSE = "close"
    ENSURE_BRIDGE = "ensure_bridge"
    DELETE_BRIDGE = "delete_bridge"
    ATTACH = "attach"
    ATTACH_HOST = "attach_host"
    DETACH = "detach"
    RETIRE = "retire"
    ENSLAVE = "enslave"
    SET_ALIAS = "set_alias"
    LINK_STATE = "link_state"
    OWNED_LINKS = "owned_links"
    HOST_ROUTES = "host_routes"
    IFNAMES_IN = "ifnames_in"
    ADDRESSES_IN = "addresses_in"
    SET_IP_FORWARD = "set_ip_forward"
    SET_IP6_FORWARD = "set_ip6_forward"
    OPEN_REAPER = "open_reaper"
    CLOSE_REAPER = "close_reaper"
    REAP = "reap"


#: Each lane is one thread of the worker running its jobs in order. The reaper has its own
#: thread and socket, so that a batch delete (tens of ms) never delays an attach.
OWNER, REAPER = "owner", "reaper"
LANES = (OWNER, REAPER)
REAPER_JOBS = frozenset({Job.OPEN_REAPER, Job.CLOSE_REAPER, Job.REAP})


def lane_of(job: str) -> str:
    """The lane that runs `job`."""
    return REAPER if job in REAPER_JOBS else OWNER


class BridgeFields(NamedTuple):
    """An `agent.core.attach.Bridge` as it crosses to the worker (same fields, same order)."""

    name: str
    alias: str
    address: str | None
    address6: str | None
    mtu: int


class AttachFields(NamedTuple):
    """An `agent.core.attach.Attachment` as it crosses to the worker (same fields, same order)."""

    netns: str
    bridge: str
    host_ifname: str
    alias: str
    ifname: str
    mac: str
    mtu: int
    address: str
    gateway: str | None
    address6: str | None
    gateway6: str | None


FRAME = struct.Struct("=I")
"""The length that precedes each pickle on the socket."""
