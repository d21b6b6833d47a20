"""agent.kernel.events against the real kernel (private netns): exact events, latency, overflow.

Each step runs `ip` while the reader runs, then collects what arrives until the expected events
are in and the stream stays quiet for QUIET seconds, so an unexpected extra event fails the
test. Latency is measured from the step's start (it includes forking `ip`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.accel import nlevents
from agent.core.naming import DYING_GROUP, LINK_GROUP
from agent.core.nlevents import AddrEvent, LinkEvent, Overflow
from agent.kernel import repair_filter
from agent.kernel.events import (
    NETLINK_ROUTE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
    Outbox,
    open_netlink,
    pump,
    serve_link_events,
)

kernel = pytest.mark.kernel

ALIAS = "netagent:net:" + "5e" * 32
QUIET = 0.15
_counter = itertools.count()


def name(prefix: str) -> str:
    return f"{prefix}{next(_counter)}"


def ifindex(dev: str) -> int:
    out = subprocess.run(["ip", "-j", "link", "show", dev], check=True, capture_output=True)
    return json.loads(out.stdout)[0]["ifindex"]


async def sh(cmd: str) -> None:
    await trio.run_process(cmd, shell=True, capture_stdout=True, capture_stderr=True)


class Stream:
    """The receiving end of a running `serve_link_events`."""

    def __init__(self, recv: trio.MemoryReceiveChannel[Any]) -> None:
        self.recv = recv
        self.latencies: list[float] = []

    async def step(self, cmd: str, count: int) -> list[Any]:
        """Run `cmd`; return the `count` events it causes, plus any that follow within QUIET."""
        start = time.perf_counter()
        await sh(cmd)
        events = []
        with trio.fail_after(5):
            while len(events) < count:
                events.append(await self.recv.receive())
        if count:
            self.latencies.append(time.perf_counter() - start)
        with trio.move_on_after(QUIET):
            events.append(await self.recv.receive())
        return events


@pytest.fixture
async def stream(nursery: trio.Nursery) -> AsyncIterator[Stream]:
    send, recv = trio.open_memory_channel[Any](1000)
    await nursery.start(serve_link_events, send)
    yield Stream(recv)


@kernel
async def test_bridge_lifecycle(stream: Stream) -> None:
    br = name("evbr")
    await sh(
        f"ip link add {br} group {LINK_GROUP} type bridge && ip link set {br} addrgenmode none"
    )
    index = ifindex(br)
    (created,) = [e async for e in _take(stream, 1)]
    assert created == LinkEvent("new", index, br, "bridge", None, 0, False, LINK_GROUP)

    def bridge(action: str, up: bool) -> LinkEvent:
        return LinkEvent(action, index, br, "bridge", ALIAS, 0, up, LINK_GROUP)

    # An alias change on a link that is down is not announced (netdev_state_change): measured.
    assert await stream.step(f"ip link set {br} alias {ALIAS}", 0) == []
    assert await stream.step(f"ip link set {br} up", 1) == [bridge("new", True)]
    assert await stream.step(f"ip addr add 10.9.0.1/24 dev {br}", 1) == [
        AddrEvent("new", index, 2, "10.9.0.1", 24)
    ]
    assert await stream.step(f"ip link set {br} down", 1) == [bridge("new", False)]
    assert await stream.step(f"ip link set {br} up", 1) == [bridge("new", True)]
    assert await stream.step(f"ip addr del 10.9.0.1/24 dev {br}", 1) == [
        AddrEvent("del", index, 2, "10.9.0.1", 24)
    ]
    assert await stream.step(f"ip link del {br}", 2) == [bridge("new", False), bridge("del", False)]
    _report(stream)


async def _take(stream: Stream, count: int) -> AsyncIterator[Any]:
    with trio.fail_after(5):
        for _ in range(count):
            yield await stream.recv.receive()


def _report(stream: Stream) -> None:
    """Print the latencies seen (bench_events and bench_reactions measure them; only the 5 s
    `fail_after` of each step is a pass/fail bound here: a kernel still tearing down thousands
    of namespaces from an earlier run can take a second to announce a namespace's deletion)."""
    ms = sorted(round(x * 1000, 1) for x in stream.latencies)
    print(f"\nevent latency from step start (incl. forking ip), ms: {ms}")


@kernel
async def test_namespace_deletion_reports_the_host_veth_dellink(stream: Stream) -> None:
    ns, veth = name("evns"), name("evv")
    await sh(
        f"ip netns add {ns} && ip link add {veth} group {LINK_GROUP} type veth peer name eth0"
        f" netns {ns} && ip link set {veth} addrgenmode none && ip link set {veth} up"
    )
    index = ifindex(veth)
    await _drain(stream)
    events = await stream.step(f"ip netns del {ns}", 2)
    assert events == [
        LinkEvent("new", index, veth, "veth", None, 0, False, LINK_GROUP),
        LinkEvent("del", index, veth, "veth", None, 0, False, LINK_GROUP),
    ]
    _report(stream)


def _notifications(sock: socket.socket) -> list[tuple[int, int, int, int | None, bytes]]:
    """Every notification queued on `sock`: (type, family, flags, IFLA_GROUP or None, bytes)."""
    found = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return found
        length, msgtype = struct.unpack_from("IH", data)
        family, flags, group = data[16], struct.unpack_from("I", data, 24)[0], None
        if msgtype in (16, 17):  # a link: walk its attributes for IFLA_GROUP
            at = 32
            while at + 4 <= length:
                size, kind = struct.unpack_from("HH", data, at)
                if kind == 27:
                    group = struct.unpack_from("I", data, at + 4)[0]
                at += max(4, (size + 3) & ~3)
        found.append((msgtype, family, flags, group, data[:length]))


@kernel
async def test_repair_filter_passes_exactly_what_keeps_says() -> None:
    # the same notifications, read through the filter and without it
    groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
    with open_netlink(NETLINK_ROUTE, groups) as plain, open_netlink(NETLINK_ROUTE, groups) as kept:
        repair_filter.attach(kept)
        br, veth, ns = name("evbr"), name("evv"), name("evns")
        await sh(
            f"ip link add {br} group {LINK_GROUP} type bridge && ip link set {br} up"
            f" && ip addr add 10.6.0.1/24 dev {br} && ip netns add {ns}"
            f" && ip link add {veth} group {LINK_GROUP} master {br} type veth peer name eth0"
            f" netns {ns} && ip link set {veth} alias {ALIAS} && ip link set {veth} up"
            f" && ip -n {ns} link set eth0 up && ip link set {veth} down"
            f" && ip link set {veth} up && ip addr del 10.6.0.1/24 dev {br}"
            f" && ip link set {veth} down nomaster group {DYING_GROUP}"
            f" && ip link del {veth} && ip link set {br} down && ip link del {br}"
            f" && ip netns del {ns}"
        )
        await trio.sleep(0.3)  # linkwatch runs late
        seen, passed = _notifications(plain), _notifications(kept)
    expected = [n for n in seen if repair_filter.keeps(*n[:4])]
    assert [n[4] for n in passed] == [n[4] for n in expected]
    kinds = {(t, f, bool(fl & 1), g) for t, f, fl, g, _ in seen}
    # the sequence made every kind the filter decides on, and it dropped some of each
    assert {(16, 7), (20, 2), (21, 2)} <= {(t, f) for t, f, *_ in kinds}
    assert any(t == 16 and up for t, _, up, _ in kinds) and any(g == DYING_GROUP for *_, g in kinds)
    assert len(passed) < len(seen)
    assert any(t == 16 and f == 0 and not up and g == LINK_GROUP for t, f, up, g in kinds)


def test_a_refused_repair_filter_is_reported_not_raised() -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    sock.close()  # EBADF: the kernel refuses
    assert repair_filter.attach(sock) is False


async def _drain(stream: Stream) -> None:
    """Swallow what earlier set-up steps caused (until QUIET seconds pass with nothing)."""
    while True:
        with trio.move_on_after(QUIET) as scope:
            await stream.recv.receive()
        if scope.cancelled_caught:
            return


@kernel
async def test_filter_keeps_our_links_and_bridge_addresses(nursery: trio.Nursery) -> None:
    send, recv = trio.open_memory_channel[Any](1000)
    ours, theirs = name("evbr"), name("evx")
    await sh(
        f"ip link add {ours} group {LINK_GROUP} type bridge && ip link add {theirs} type bridge"
        f" && ip link set {ours} addrgenmode none && ip link set {theirs} addrgenmode none"
    )
    indexes = {ifindex(ours)}
    await nursery.start(partial(serve_link_events, send, group=LINK_GROUP, indexes=indexes))
    stream = Stream(recv)
    foreign = f"ip link set {theirs} up && ip addr add 10.8.0.1/24 dev {theirs}"
    assert await stream.step(foreign, 0) == []
    events = await stream.step(f"ip link set {ours} up && ip addr add 10.7.0.1/24 dev {ours}", 2)
    assert [type(e).__name__ for e in events] == ["LinkEvent", "AddrEvent"]
    assert {e.index for e in events} == indexes
    await sh(f"ip link del {ours} && ip link del {theirs}")


def netlink_socket_stats(groups: str = "00000111") -> list[tuple[int, int]]:
    """(Rmem, Drops) of each NETLINK_ROUTE socket of this namespace bound to `groups`."""
    rows = []
    with open("/proc/net/netlink") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == "0" and cols[3] == groups:
                rows.append((int(cols[4]), int(cols[8])))
    return rows


@kernel
async def test_full_channel_drops_then_overflow_never_blocks(nursery: trio.Nursery) -> None:
    br = name("evburst")
    await sh(f"ip link add {br} type bridge && ip link set {br} addrgenmode none")
    send, recv = trio.open_memory_channel[Any](1)
    await nursery.start(serve_link_events, send)
    burst = "".join(f"link set {br} up\nlink set {br} down\n" for _ in range(250))
    start = time.perf_counter()
    await trio.run_process(["ip", "-b", "-"], stdin=burst.encode())
    await trio.sleep(0.2)  # the reader drains the socket meanwhile; nobody reads the channel
    assert netlink_socket_stats() == [(0, 0)]  # socket empty, nothing dropped by the kernel
    first = recv.receive_nowait()
    assert first == LinkEvent("new", ifindex(br), br, "bridge", None, 0, True, 0)
    assert recv.receive_nowait() == Overflow("link", "channel")  # delivered as room appeared
    with pytest.raises(trio.WouldBlock):
        recv.receive_nowait()
    print(f"500 changes; burst + drain {1000 * (time.perf_counter() - start):.0f} ms")
    # The consumer resyncs with a dump, then events flow again.
    dump = subprocess.run(["ip", "-j", "link", "show", br], capture_output=True, check=True)
    assert "UP" not in json.loads(dump.stdout)[0]["flags"]
    await sh(f"ip link set {br} up")
    with trio.fail_after(5):
        assert (await recv.receive()).up is True
    await sh(f"ip link del {br}")


@kernel
async def test_kernel_drop_enobufs_gives_overflow(nursery: trio.Nursery) -> None:
    """The socket buffer overflows while the reader is held up: ENOBUFS becomes an Overflow."""
    br = name("evnob")
    await sh(f"ip link add {br} type bridge && ip link set {br} addrgenmode none")
    send, recv = trio.open_memory_channel[Any](1000)
    sock = open_netlink(NETLINK_ROUTE, RTMGRP_LINK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
    outbox = Outbox(send, nursery, "link")
    nursery.start_soon(pump, sock, outbox, nlevents.decode)
    burst = "".join(f"link set {br} up\nlink set {br} down\n" for _ in range(50))
    # Blocking call on purpose: the reader cannot run until the kernel has dropped events.
    subprocess.run(["ip", "-b", "-"], input=burst.encode(), check=True)
    with trio.fail_after(5):
        got = [await recv.receive()]
        while not isinstance(got[-1], Overflow):
            got.append(await recv.receive())
    assert got[-1] == Overflow("link", "kernel")
    assert len(got) < 100  # some of the 100 events were lost
    await sh(f"ip link del {br}")
    with trio.fail_after(5):  # the socket keeps working after ENOBUFS
        while (event := await recv.receive()).action != "del":
            pass
    assert event.name == br
    sock.close()


# --- Outbox, without the kernel: every drop is followed by an Overflow the consumer reads later
@given(
    ops=st.lists(st.sampled_from(["put", "put", "recv", "yield"]), max_size=60),
    size=st.integers(0, 3),
)
@settings(max_examples=300, deadline=None)
def test_outbox_every_drop_is_followed_by_an_overflow(ops: list[str], size: int) -> None:
    received: list[tuple[int, Any]] = []  # (step, value)
    put_at: dict[int, int] = {}

    async def scenario() -> None:
        send, recv = trio.open_memory_channel[Any](size)
        async with trio.open_nursery() as nursery:
            outbox = Outbox(send, nursery, "link")
            for step, op in enumerate(ops):
                if op == "put":
                    put_at[len(put_at)] = step
                    outbox.put(len(put_at) - 1)
                elif op == "recv":
                    with contextlib.suppress(trio.WouldBlock):
                        received.append((step, recv.receive_nowait()))
                else:
                    await trio.sleep(0)
            while True:  # drain, letting a pending helper finish
                await trio.testing.wait_all_tasks_blocked()
                try:
                    received.append((len(ops), recv.receive_nowait()))
                except trio.WouldBlock:
                    break

    trio.run(scenario)
    got = [v for _, v in received if not isinstance(v, Overflow)]
    assert got == sorted(got)  # order kept
    overflow_steps = [step for step, v in received if isinstance(v, Overflow)]
    for value, step in put_at.items():
        if value not in got:
            assert any(s >= step for s in overflow_steps), (value, step, received)
    assert len(overflow_steps) <= len(put_at) - len(got)  # never more Overflows than losses
