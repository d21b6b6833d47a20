"""The UDP thread of the DNS server (agent/dns/udpthread.py) on real loopback sockets (in the
test's private namespace: `kernel` tests): cache hits answered by the thread, misses handed
to the Trio thread, a forgotten answer never served again, removal before close, shutdown."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import trio

from agent import accel
from agent.dns.udpthread import UdpThread

pytestmark = pytest.mark.kernel

QUESTION = b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01"


class Listener:
    """What the thread needs of `agent.dns.server.Listener`: `udp`, `batch`, `net_id`."""

    def __init__(self, net_id: str) -> None:
        self.net_id = net_id
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.batch = accel.dnsudp.Batch(self.udp, "127.0.0.0/8")


async def receive(client: socket.socket, n: int) -> list[bytes]:
    got = []
    with trio.fail_after(5):
        while len(got) < n:
            try:
                got.append(client.recv(4096))
            except BlockingIOError:
                await trio.sleep(0.001)
    return got


async def test_hits_are_answered_by_the_thread_and_misses_by_trio() -> None:
    caches: dict[str, Any] = {"n1": {QUESTION: (b"one",)}, "n2": {QUESTION: (b"two",)}}
    misses: list[tuple[str, bytes, str]] = []
    thread = UdpThread(caches, lambda lst, m: misses.extend(
        (lst.net_id, data, threading.current_thread().name) for data, _ in m
    ))  # fmt: skip
    a, b = Listener("n1"), Listener("n2")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    try:
        thread.add(a)
        thread.add(b)
        client.sendto(b"\x00\x01" + QUESTION, a.udp.getsockname())
        client.sendto(b"\x00\x02" + QUESTION, b.udp.getsockname())
        assert sorted(await receive(client, 2)) == [b"\x00\x01one", b"\x00\x02two"]
        # forgotten (a disconnect): the next query is a miss, handed to the Trio thread
        del caches["n1"]
        client.sendto(b"\x00\x03" + QUESTION, a.udp.getsockname())
        with trio.fail_after(5):
            while not misses:
                await trio.sleep(0.001)
        assert misses == [("n1", b"\x00\x03" + QUESTION, threading.current_thread().name)]
        # removed: no longer served (the socket may be closed at once)
        thread.remove(b)
        client.sendto(b"\x00\x04" + QUESTION, b.udp.getsockname())
        await trio.sleep(0.2)
        with pytest.raises(BlockingIOError):
            client.recv(4096)
        b.udp.close()
        client.sendto(b"\x00\x05" + QUESTION, a.udp.getsockname())
        with trio.fail_after(5):  # n1 is served still (a miss: its cache is gone)
            while len(misses) < 2:
                await trio.sleep(0.001)
    finally:
        thread.close()
        for s in (a.udp, b.udp, client):
            s.close()
    assert not any(t.name == "netagent-dns-udp" for t in threading.enumerate())


async def test_misses_waiting_for_the_trio_thread_are_bounded() -> None:
    """The Trio thread busy (here: not yielding), a flood of misses is not queued without
    bound: past `MAX_QUEUED` batches they are dropped, and handled again once it catches up."""
    from agent.dns import udpthread

    got: list[bytes] = []
    thread = UdpThread({}, lambda lst, m: got.extend(data for data, _ in m))
    a = Listener("n1")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    try:
        thread.add(a)
        sent = 0
        deadline = time.monotonic() + 10
        while thread.dropped == 0 and time.monotonic() < deadline:  # Trio never runs meanwhile
            client.sendto(b"\x00\x01" + QUESTION, a.udp.getsockname())
            sent += 1
            if sent % 20 == 0:
                time.sleep(0.001)  # let the thread read: one batch each
        assert thread.dropped > 0
        await trio.sleep(0.05)  # the queued batches are handled now
        assert 0 < len(got) <= udpthread.MAX_QUEUED * a.batch.size
        before = len(got)
        client.sendto(b"\x00\x02" + QUESTION, a.udp.getsockname())
        with trio.fail_after(5):
            while len(got) == before:
                await trio.sleep(0.001)
    finally:
        thread.close()
        for s in (a.udp, client):
            s.close()
