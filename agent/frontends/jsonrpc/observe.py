"""One place around every request handler: its latency and outcome, and the audit log.

`observed(table, on_request)` returns the method table with each handler wrapped. The wrapper
times the handler, calls `on_request(method, outcome, seconds)` (outcome: "ok", the
`AgentError` kind, "internal" for anything else, "cancelled") and, for every method that can
change something (all but `READ_ONLY`), logs one `audit` line: method, outcome, params and
duration, with the peer's uid and pid, which the server binds to each connection
(`peer_uid`, `peer_pid`, from SO_PEERCRED) and the log's context carries into the line.
A method added later is audited unless it is listed here as read-only.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import msgspec

from agent.core.errors import AgentError
from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.server import Handler
from agent.log import get_logger

log = get_logger("agent.audit")

#: methods that change nothing: not audited
READ_ONLY = frozenset(
    {"system.info", "system.ruleset", "network.list", "network.inspect", "endpoint.list",
     "events.subscribe"}
)  # fmt: skip

OnRequest = Callable[[str, str, float], None]


def observed(table: dict[str, Handler], on_request: OnRequest | None) -> dict[str, Handler]:
    """The same methods, each timed, reported to `on_request` and (mutations) audited."""
    return {method: _wrap(method, h, on_request) for method, h in table.items()}


def _wrap(method: str, handler: Handler, on_request: OnRequest | None) -> Handler:
    audited = method not in READ_ONLY

    @functools.wraps(handler)
    async def wrapper(params: p.Params) -> Any:
        start = time.perf_counter()
        outcome = "internal"
        try:
            result = await handler(params)
            outcome = "ok"
            return result
        except AgentError as exc:
            outcome = exc.kind
            raise
        except BaseException as exc:
            outcome = "internal" if isinstance(exc, Exception) else "cancelled"
            raise
        finally:
            seconds = time.perf_counter() - start
            if on_request is not None:
                on_request(method, outcome, seconds)
            if audited:
                log.info(
                    "audit", method=method, outcome=outcome, params=msgspec.to_builtins(params),
                    duration_ms=round(seconds * 1000, 3),
                )  # fmt: skip

    return wrapper
