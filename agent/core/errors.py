"""Errors by meaning, each with a stable `code` and `kind` for the wire and for exit codes.

`agent.frontends.jsonrpc.server` is the only place that turns these into JSON-RPC errors;
`agentctl` maps `kind` to its exit code. Shells raise them `from` the low-level exception they
translate.
"""

from __future__ import annotations

TYPE_CHECKING = False  # `typing` would cost every agentctl run ~4 ms; type checkers see True
if TYPE_CHECKING:
    from typing import Any, ClassVar


class AgentError(Exception):
    """Base of every error the agent reports to a client."""

    code: ClassVar[int] = 500
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data

    def to_data(self) -> dict[str, Any]:
        """Structured details for the wire: kind plus any fields given at construction."""
        return {"kind": self.kind, **self.data}


class InvalidArgument(AgentError):
    """The request is malformed or names an impossible value (bad CIDR, name too long...)."""

    code = 400
    kind = "invalid_argument"


class PermissionDenied(AgentError):
    """The peer may not use the control socket (not root, not in the socket's group)."""

    code = 403
    kind = "permission"


class NotFound(AgentError):
    """A network, endpoint or namespace that the request names does not exist."""

    code = 404
    kind = "not_found"


class Conflict(AgentError):
    """The request collides with existing state (name taken, subnet overlap, address in use)."""

    code = 409
    kind = "conflict"


class Busy(AgentError):
    """The object is in use (a network with endpoints) or the agent is shutting down."""

    code = 423
    kind = "busy"


class PoolExhausted(AgentError):
    """No free subnet in the address pools, or no free address in a network."""

    code = 507
    kind = "pool_exhausted"


class KernelError(AgentError):
    """A netlink or namespace operation failed for a reason the request did not cause."""

    code = 502
    kind = "kernel"


class FirewallApply(AgentError):
    """iptables-restore refused a transaction; `data['line']` names the offending line."""

    code = 503
    kind = "firewall"


class StorageError(AgentError):
    """The state database could not be written (disk full, I/O error, lost and not rewritable):
    the request changed nothing. Reads are still answered from memory."""

    code = 520
    kind = "storage"


ERRORS_BY_KIND: dict[str, type[AgentError]] = {
    cls.kind: cls
    for cls in (
        AgentError,
        InvalidArgument,
        NotFound,
        Conflict,
        Busy,
        PoolExhausted,
        KernelError,
        FirewallApply,
        StorageError,
        PermissionDenied,
    )
}
