"""Firewall backends behind one protocol (`base.Firewall`), chosen by name (`agentd --firewall`).

Layout:
    base.py       the `Firewall` protocol the service and the reconciler use
    iptables/     the iptables backend (iptables-restore, ip6tables-restore)
    nftables/     the nftables backend (one inet table, hash sets and maps, libnftables)
    conntrack.py  published ports' kernel side effects, shared by backends
    monitor.py    nf_tables change notifications (what `Firewall.foreign` judges)

Importing this package imports no backend: `create` does, for the one it is asked for (and
`agent.accel` loads the pure serialiser twin from `agent.firewall.iptables` early).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.core.errors import InvalidArgument

if TYPE_CHECKING:
    from agent.firewall.base import Firewall

#: The backends `create` knows, by name; the first is the default.
BACKENDS = ("iptables", "nftables")
#: What `agentd --firewall` takes: a backend, or "auto" (`resolve` picks one).
CHOICES = (*BACKENDS, "auto")


def resolve(kind: str) -> str:
    """`kind`, or for "auto" the backend this host runs best: nftables where libnftables loads
    and the kernel answers it (one `list tables`), iptables otherwise."""
    if kind != "auto":
        return kind
    from agent.firewall.nftables.backend import NftablesFirewall

    return "nftables" if NftablesFirewall.usable() else "iptables"


def create(kind: str) -> Firewall:
    """A new backend of kind `kind` (see `BACKENDS`), not yet set up.

    Raises:
        InvalidArgument: `kind` is not a known backend.
    """
    if kind == "iptables":
        from agent.firewall.iptables.backend import IptablesFirewall

        return IptablesFirewall.default()
    if kind == "nftables":
        from agent.firewall.nftables.backend import NftablesFirewall

        return NftablesFirewall.default()
    raise InvalidArgument(
        f"unknown firewall backend {kind!r} (known: {', '.join(BACKENDS)})", firewall=kind
    )
