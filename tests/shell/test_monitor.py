"""agent.firewall.monitor: nf_tables transactions as NftChange, from synthetic bytes and from
the real kernel (private netns) with the pid of the process that committed them."""

from __future__ import annotations

import itertools
import struct
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from agent.core.nlevents import Overflow
from agent.firewall.monitor import NftChange, NftDecoder, serve_nft_changes

_counter = itertools.count()


# --- the decoder, on messages built like the kernel's ---------------------------------------
def nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nfmsg(msg: int, family: int, attrs: bytes, subsys: int = 10) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    size = 16 + len(body)
    return struct.pack("=IHHII", size, subsys << 8 | msg, 0, 0, 0) + body + b"\0" * (-size % 4)


def rule(msg: int, family: int, table: str, subsys: int = 10) -> bytes:
    return nfmsg(msg, family, nla(1, table.encode() + b"\0") + nla(2, b"X\0"), subsys)


def gen(genid: int, pid: int, comm: bytes) -> bytes:
    attrs = nla(1, struct.pack(">I", genid)) + nla(2, struct.pack(">I", pid)) + nla(3, comm)
    return nfmsg(15, 0, attrs)


def test_decoder_spans_datagrams_and_resets() -> None:
    decoder = NftDecoder()
    assert decoder.feed(rule(6, 2, "filter") + rule(8, 2, "filter") + rule(3, 2, "nat")) == []
    assert decoder.feed(rule(0, 1, "foo") + rule(7, 10, "ignored-get")) == []
    assert decoder.feed(gen(0x102, 4242, b"iptables-restor\0")) == [
        NftChange(
            0x102, 4242, "iptables-restor", frozenset({(2, "filter"), (2, "nat"), (1, "foo")})
        )
    ]
    assert decoder.feed(rule(6, 2, "filter")) == []
    decoder.reset()
    assert decoder.feed(gen(0x103, 1, b"nft\0") + gen(0x104, 2, b"nft\0")) == [
        NftChange(0x103, 1, "nft", frozenset()),
        NftChange(0x104, 2, "nft", frozenset()),
    ]


def test_decoder_ignores_other_subsystems() -> None:
    assert NftDecoder().feed(rule(6, 2, "filter", subsys=1) + nfmsg(15, 0, b"", subsys=1)) == []


@pytest.mark.parametrize(
    "buf",
    [
        b"\x20\0\0\0",
        rule(6, 2, "filter")[:-4],
        nfmsg(6, 2, b"\x02\0\1\0"),
        nfmsg(15, 0, nla(1, b"\0\1")),
        struct.pack("=IHHII", 18, 10 << 8 | 6, 0, 0, 0) + b"\2\0",
    ],
)
def test_decoder_malformed_raises_value_error(buf: bytes) -> None:
    with pytest.raises(ValueError):
        NftDecoder().feed(buf)


# --- the real kernel ------------------------------------------------------------------------
@pytest.fixture
async def changes(nursery: trio.Nursery) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    send, recv = trio.open_memory_channel[Any](100)
    await nursery.start(serve_nft_changes, send)
    yield recv


async def commit(
    recv: trio.MemoryReceiveChannel[Any], cmd: tuple[str, ...], stdin: str, count: int
) -> tuple[int, list[NftChange]]:
    """Run `cmd` (its own process: its pid is the committer's); return its pid and changes."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(stdin)
    assert proc.returncode == 0, err
    with trio.fail_after(5):
        return proc.pid, [await recv.receive() for _ in range(count)]


FILTER, NAT = frozenset({(2, "filter")}), frozenset({(2, "nat")})


@pytest.mark.kernel
async def test_iptables_commands_each_give_one_change_per_table(
    changes: trio.MemoryReceiveChannel[Any],
) -> None:
    chain = f"MON{next(_counter)}"
    masquerade = ("-s", "10.6.0.0/16", "-j", "MASQUERADE")
    restore = f"*filter\n-A {chain} -j DROP\nCOMMIT\n*nat\n:{chain} - [0:0]\nCOMMIT\n"
    table = frozenset({(1, f"foo{chain}")})
    steps: list[tuple[tuple[str, ...], str, str, list[frozenset[tuple[int, str]]]]] = [
        (("iptables", "-N", chain), "", "iptables", [FILTER]),
        (("iptables", "-A", chain, "-j", "ACCEPT"), "", "iptables", [FILTER]),
        (("iptables", "-F", chain), "", "iptables", [FILTER]),
        (("iptables", "-t", "nat", "-A", "POSTROUTING", *masquerade), "", "iptables", [NAT]),
        # iptables-restore (nft backend) commits each table section on its own
        (("iptables-restore", "--noflush"), restore, "iptables-restor", [FILTER, NAT]),
        (("ip6tables", "-N", chain), "", "ip6tables", [frozenset({(10, "filter")})]),
        (("nft", "add", "table", "inet", f"foo{chain}"), "", "nft", [table]),
        (("nft", "delete", "table", "inet", f"foo{chain}"), "", "nft", [table]),
    ]
    genids = []
    for cmd, stdin, comm, tables in steps:
        pid, got = await commit(changes, cmd, stdin, len(tables))
        assert [(c.pid, c.comm, c.tables) for c in got] == [(pid, comm, t) for t in tables], cmd
        genids += [c.genid for c in got]
    assert genids == list(range(genids[0], genids[0] + len(genids)))  # one commit each, no gap
    # Reading the ruleset commits nothing.
    subprocess.run(["iptables-save"], check=True, capture_output=True)
    with trio.move_on_after(0.1):
        pytest.fail(f"unexpected change: {await changes.receive()}")


@pytest.mark.kernel
async def test_full_channel_gives_overflow(nursery: trio.Nursery) -> None:
    send, recv = trio.open_memory_channel[Any](1)
    await nursery.start(serve_nft_changes, send)
    chain = f"MONX{next(_counter)}"
    subprocess.run(["iptables", "-N", chain], check=True)
    for _ in range(3):
        subprocess.run(["iptables", "-A", chain, "-j", "ACCEPT"], check=True)
    await trio.sleep(0.1)
    first = recv.receive_nowait()
    assert isinstance(first, NftChange) and first.tables == {(2, "filter")}
    assert recv.receive_nowait() == Overflow("nft", "channel")
    with pytest.raises(trio.WouldBlock):
        recv.receive_nowait()
    proc = subprocess.Popen(["iptables", "-F", chain])
    proc.wait()
    with trio.fail_after(5):
        assert (await recv.receive()).pid == proc.pid
