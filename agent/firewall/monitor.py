"""nftables change notifications: who changed the ruleset, and which tables, as it happens.

Theory of operation: iptables here is the nft backend, so every change (`iptables -F`, another
tool's `iptables-restore`, the agent's own transactions, `nft`) is an nf_tables transaction.
On commit the kernel announces each object it created or deleted on NETLINK_NETFILTER, group
NFNLGRP_NFTABLES (what `nft monitor` shows), then one NFT_MSG_NEWGEN message that closes the
transaction and names the committing process (`nf_tables_gen_notify`). `NftDecoder` gathers
the (family, table) of every NFT_MSG_NEW*/DEL* message until that NEWGEN, then yields one
`NftChange`. Aborted transactions announce nothing.

Measured on kernel 6.18 with iptables 1.8.9 (nf_tables): `iptables -N X` gives NEWTABLE (only
when the table is new) + NEWCHAIN + NEWGEN; `iptables -F X` one DELRULE per rule + NEWGEN;
`iptables-restore --noflush` one transaction per table section (each COMMIT line);
`iptables -L` and `iptables-save` nothing.

Every message's nfgenmsg carries the family (NFPROTO_INET 1, IPV4 2, ARP 3, NETDEV 5,
BRIDGE 7, IPV6 10) and each object's first attribute type 1 is its table's name
(NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...). NEWGEN's
attributes are big-endian: NFTA_GEN_ID, NFTA_GEN_PROC_PID (the committing thread's pid in the
initial PID namespace, `task_pid_nr(current)`), NFTA_GEN_PROC_NAME (its comm, 15 bytes at most).

The socket is read like the rtnetlink one (`agent.kernel.events.pump`): never blocking, an
`Overflow(source="nft")` after any loss, after which the consumer resyncs (iptables-save).
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import trio

from agent.core.nlattrs import attrs as _attrs  # the one checked attribute walk
from agent.core.nlattrs import be32
from agent.core.nlattrs import cstr as _cstr
from agent.kernel.events import Outbox, open_netlink, pump

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NLMSG_HDRLEN = 16
NFGENMSG_LEN = 4

NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10

NFT_MSG_NEWGEN = 15
# enum nf_tables_msg_types: the messages that create or delete an object of a table.
# (GET*, TRACE and NEWGEN are not changes; DESTROY* are requests the kernel echoes as DEL*.)
CHANGE_MESSAGES = frozenset({0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 18, 20, 22, 24, *range(26, 33)})
NFTA_TABLE = 1  # NFTA_TABLE_NAME and every NFTA_<object>_TABLE
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3

_HDR = struct.Struct("=IH")


class NftChange(msgspec.Struct, frozen=True):
    """One committed nf_tables transaction: generation, committer, and the tables it touched."""

    genid: int
    pid: int
    comm: str
    tables: frozenset[tuple[int, str]]


class NftDecoder:
    """Turns NFNLGRP_NFTABLES datagrams into `NftChange`s; keeps the open transaction's tables.

    Pure (no I/O). Error handling: a malformed datagram raises `ValueError`; the reader then
    calls `reset` and reports an `Overflow`.
    """

    def __init__(self) -> None:
        self._tables: set[tuple[int, str]] = set()

    def reset(self) -> None:
        """Forget the transaction in progress (its messages were partly lost)."""
        self._tables = set()

    def feed(self, buf: bytes | bytearray | memoryview) -> list[NftChange]:
        """The transactions that `buf` completes (usually none or one).

        Raises:
            ValueError: the datagram is malformed.
        """
        view = memoryview(buf)
        end = len(view)
        changes = []
        pos = 0
        while pos < end:
            if end - pos < NLMSG_HDRLEN:
                raise ValueError(f"truncated netlink header at offset {pos}")
            size, kind = _HDR.unpack_from(view, pos)
            if size < NLMSG_HDRLEN or size > end - pos:
                raise ValueError(f"bad netlink message length {size} at offset {pos}")
            if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                msg = kind & 0xFF
                if msg == NFT_MSG_NEWGEN:
                    changes.append(self._commit(view, pos + NLMSG_HDRLEN, pos + size))
                elif msg in CHANGE_MESSAGES:
                    self._touch(view, pos + NLMSG_HDRLEN, pos + size)
            pos += (size + 3) & ~3
        return changes

    def _touch(self, view: memoryview, start: int, end: int) -> None:
        if end - start < NFGENMSG_LEN:
            raise ValueError(f"truncated nfgenmsg at offset {start}")
        for kind, a, b in _attrs(view, start + NFGENMSG_LEN, end):
            if kind == NFTA_TABLE:
                self._tables.add((view[start], _cstr(view, a, b)))
                return

    def _commit(self, view: memoryview, start: int, end: int) -> NftChange:
        if end - start < NFGENMSG_LEN:
            raise ValueError(f"truncated nfgenmsg at offset {start}")
        genid = pid = 0
        comm = ""
        for kind, a, b in _attrs(view, start + NFGENMSG_LEN, end):
            if kind == NFTA_GEN_ID:
                genid = be32(view, a, b)
            elif kind == NFTA_GEN_PROC_PID:
                pid = be32(view, a, b)
            elif kind == NFTA_GEN_PROC_NAME:
                comm = _cstr(view, a, b)
        change = NftChange(genid, pid, comm, frozenset(self._tables))
        self._tables = set()
        return change


async def serve_nft_changes(
    send: trio.MemorySendChannel[Any],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send one `NftChange` per committed nf_tables transaction to `send`, until cancelled.

    Values sent: `NftChange` and `Overflow(source="nft")` (resync: changes were lost). Reports
    started once the socket has joined the group. The channel is not closed on exit.
    """
    decoder = NftDecoder()
    with open_netlink(NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1)) as sock:
        async with trio.open_nursery() as nursery:
            outbox = Outbox(send, nursery, "nft")
            task_status.started()
            await pump(sock, outbox, decoder.feed, on_loss=decoder.reset)
