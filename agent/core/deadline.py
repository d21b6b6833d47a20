"""The per-request deadline for starting kernel work (`agentd --request-timeout`).

The API server gives each request a `Deadline` (through the context variable `CURRENT`, which
Trio copies into the tasks a request spawns); the kernel connection reads it when it sends a
job. Only the request's first kernel job is bound by it: if the worker has not begun that job
by `at`, the request fails with Busy and the job is never run (the worker asks agentd before
it begins such a job, and agentd answers no once the caller gave up). Once the first job has
begun, the request's later jobs (its rollbacks included) run without a deadline, so that a
change is never left half-done by a timeout.

Pure: `at` is a time on the caller's monotonic clock; whoever sets it reads the clock.
"""

from __future__ import annotations

from contextvars import ContextVar


class Deadline:
    """When a request must have begun its kernel work by; `at` is None once it has begun."""

    __slots__ = ("at", "seconds")

    def __init__(self, at: float, seconds: float) -> None:
        self.at: float | None = at
        self.seconds = seconds  # the configured timeout, for messages

    def take(self) -> float | None:
        """The deadline for the next kernel job, cleared: only the first job is bound."""
        at, self.at = self.at, None
        return at


#: The deadline of the request the current task serves (None outside requests: start-up,
#: adoption and live repairs have no deadline).
CURRENT: ContextVar[Deadline | None] = ContextVar("netagent_request_deadline", default=None)
