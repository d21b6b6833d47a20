"""The DNS server's UDP hot path: pure twin and Cython accelerator, reply for reply.

Real UDP sockets on loopback (in the test's private namespace: `kernel` tests): clients send
datagrams to a server socket, one `serve` call answers them; the replies each client receives,
the misses handed back, the count read and the round-robin turn are the result. Case tables
pin the rules (agent/dns/udpbatch.py's docstring); hypothesis-made datagrams and caches check
that the twins give the same results.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import accel
from agent.dns import udpbatch as pure

try:
    fast: ModuleType | None = importlib.import_module("_fast.dnsudp")
except ImportError:  # pragma: no cover - extension not built
    fast = None

needs_fast = pytest.mark.skipif(fast is None, reason="_fast.dnsudp is not built")
IMPLS = [pytest.param(pure, id="pure"), pytest.param(fast, id="cython", marks=needs_fast)]
pytestmark = pytest.mark.kernel

QUESTION = b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01"
ANSWER = b"\x85\x80" + b"\x00\x01" * 2 + b"\x00\x00" * 2 + b"(records)"


def caches(cache: dict[bytes, tuple[bytes, ...]] | None) -> dict[str, Any]:
    """The server's network -> cache dict, with `cache` as network "n"'s."""
    return {} if cache is None else {"n": cache}


class Net:
    """A server socket on 127.0.0.1 and three clients: two in 127.0.0.0/31, one (127.0.0.2)
    outside it."""

    SUBNET = "127.0.0.0/31"

    def __init__(self, family: int = socket.AF_INET) -> None:
        self.family = family
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.server = socket.socket(family, socket.SOCK_DGRAM)
        self.server.bind((host, 0))
        self.server.setblocking(False)
        sources = [host, host] if family == socket.AF_INET6 else [host, host, "127.0.0.2"]
        self.clients = []
        for source in sources:
            client = socket.socket(family, socket.SOCK_DGRAM)
            client.bind((source, 0))
            client.setblocking(False)
            self.clients.append(client)
        self.ports = {c.getsockname()[1]: i for i, c in enumerate(self.clients)}

    def send(self, datagrams: list[tuple[int, bytes]]) -> None:
        for client, data in datagrams:
            self.clients[client].sendto(data, self.server.getsockname())

    def received(self) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        for client in self.clients:
            got = []
            while True:
                try:
                    got.append(client.recv(65535))
                except BlockingIOError:
                    break
            out.append(got)
        return out

    def drain(self) -> None:
        while True:
            try:
                self.server.recv(65535)
            except BlockingIOError:
                return

    def close(self) -> None:
        for s in (self.server, *self.clients):
            s.close()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def serve(impl: Any, net: Net, cache: Any, turn: int, size: int = 64, subnet: str = "") -> Any:
    """One `serve` call; the misses' sources as client indexes, and what each client got."""
    batch = impl.Batch(net.server, subnet or Net.SUBNET, size)
    read, turn, misses = batch.serve(caches(cache), "n", turn)
    named = []
    for data, peer in misses:
        assert peer == net.clients[net.ports[peer[1]]].getsockname()  # as recvfrom gives it
        named.append((data, net.ports[peer[1]]))
    return read, turn, named, net.received()


# --- the rules, case by case -----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_a_hit_is_answered_with_the_query_id_and_a_miss_handed_back(impl: Any, net: Net) -> None:
    other = QUESTION.replace(b"web", b"xyz")
    net.send([(0, b"\xab\xcd" + QUESTION), (1, b"\x00\x07" + other), (1, b"\x00\x08" + QUESTION)])
    read, turn, misses, got = serve(impl, net, {QUESTION: (ANSWER,)}, 5)
    assert (read, turn) == (3, 5)  # one order: no turn taken
    assert misses == [(b"\x00\x07" + other, 1)]
    assert got == [[b"\xab\xcd" + ANSWER], [b"\x00\x08" + ANSWER], []]


@pytest.mark.parametrize("impl", IMPLS)
def test_several_orders_are_handed_out_in_turn(impl: Any, net: Net) -> None:
    orders = (b"order-0" * 3, b"order-1" * 3, b"order-2" * 3)
    net.send([(0, bytes([0, i]) + QUESTION) for i in range(4)])
    read, turn, misses, got = serve(impl, net, {QUESTION: orders}, 7)
    assert (read, turn, misses) == (4, 11, [])
    assert got[0] == [bytes([0, i]) + orders[(8 + i) % 3] for i in range(4)]


@pytest.mark.parametrize("impl", IMPLS)
def test_outsiders_short_and_oversized_datagrams_are_dropped(impl: Any, net: Net) -> None:
    net.send([
        (2, b"\x00\x01" + QUESTION),  # from 127.0.0.2: not in 127.0.0.0/31
        (0, QUESTION[:11]),  # shorter than a header
        (0, b"\x00\x02" + QUESTION + b"\0" * 4096),  # longer than MAX_QUERY
        (1, b"\x00\x03" + b"\x99" * 40),  # garbage, from inside: a miss
    ])  # fmt: skip
    read, turn, misses, got = serve(impl, net, {QUESTION: (ANSWER,)}, 0)
    assert (read, turn, got) == (4, 0, [[], [], []])
    assert misses == [(b"\x00\x03" + b"\x99" * 40, 1)]


@pytest.mark.parametrize("impl", IMPLS)
def test_without_a_cache_everything_allowed_is_a_miss(impl: Any, net: Net) -> None:
    net.send([(0, b"\x00\x01" + QUESTION), (2, b"\x00\x02" + QUESTION)])
    read, _, misses, got = serve(impl, net, None, 0)
    assert (read, misses, got) == (2, [(b"\x00\x01" + QUESTION, 0)], [[], [], []])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_call_reads_at_most_its_size_and_never_blocks(impl: Any, net: Net) -> None:
    net.send([(0, bytes([0, i]) + QUESTION) for i in range(5)])
    batch = impl.Batch(net.server, Net.SUBNET, 3)
    assert batch.serve(caches({QUESTION: (ANSWER,)}), "n", 0)[0] == 3
    assert batch.serve(caches({QUESTION: (ANSWER,)}), "n", 0)[0] == 2
    assert batch.serve(caches({QUESTION: (ANSWER,)}), "n", 0) == (0, 0, [])
    assert net.received()[0] == [bytes([0, i]) + ANSWER for i in range(5)]


@pytest.mark.parametrize("impl", IMPLS)
def test_batches_of_several_sockets_and_sizes_keep_to_their_own(impl: Any, net: Net) -> None:
    # the Cython twin's buffers are shared by every Batch (grown to the largest size)
    other = Net()
    try:
        small = impl.Batch(net.server, Net.SUBNET, 2)
        large = impl.Batch(other.server, Net.SUBNET, 5)
        net.send([(0, bytes([1, i]) + QUESTION) for i in range(3)])
        other.send([(1, bytes([2, i]) + QUESTION) for i in range(6)])
        assert small.serve(caches({QUESTION: (b"small",)}), "n", 0)[0] == 2
        assert large.serve(caches({QUESTION: (b"large",)}), "n", 0)[0] == 5
        assert small.serve(caches({QUESTION: (b"small",)}), "n", 0)[0] == 1
        assert large.serve(caches(None), "n", 0) == (
            1,
            0,
            [(bytes([2, 5]) + QUESTION, other.clients[1].getsockname())],
        )
        assert net.received()[0] == [bytes([1, i]) + b"small" for i in range(3)]
        assert other.received()[1] == [bytes([2, i]) + b"large" for i in range(5)]
    finally:
        other.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_closed_socket_raises_oserror(impl: Any, net: Net) -> None:
    batch = impl.Batch(net.server, Net.SUBNET)
    net.server.close()
    with pytest.raises(OSError):
        batch.serve(caches({}), "n", 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("subnet", "allowed"), [("::1/128", True), ("fd00::/64", False)])
def test_ipv6_sources_are_checked_against_the_subnet(impl: Any, subnet: str, allowed: bool) -> None:
    net = Net(socket.AF_INET6)
    try:
        net.send([(0, b"\x00\x01" + QUESTION), (1, b"\x00\x02" + QUESTION.upper())])
        batch = impl.Batch(net.server, subnet)
        read, _, misses = batch.serve(caches({QUESTION: (ANSWER,)}), "n", 0)
        assert read == 2
        assert [data for data, _ in misses] == ([b"\x00\x02" + QUESTION.upper()] if allowed else [])
        for _, peer in misses:
            assert peer == net.clients[1].getsockname()  # (host, port, flowinfo, scope)
        assert net.received() == [[b"\x00\x01" + ANSWER] if allowed else [], []]
    finally:
        net.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_size_below_one_is_refused(impl: Any, net: Net) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        impl.Batch(net.server, Net.SUBNET, 0)


def test_accel_selects_the_extension_when_built() -> None:
    forced_pure = os.environ.get("NETAGENT_PURE") == "1"
    assert accel.dnsudp is (pure if forced_pure or fast is None else fast)


# --- the twins agree ---------------------------------------------------------------------------

questions = st.lists(st.binary(min_size=10, max_size=40), min_size=1, max_size=4, unique=True)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[bytes, tuple[bytes, ...]], list[tuple[int, bytes]]]:
    asked = draw(questions)
    cached = draw(st.lists(st.sampled_from(asked), unique=True))
    cache = {
        q: tuple(draw(st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=4)))
        for q in cached
    }
    datagram = st.one_of(
        st.tuples(st.binary(min_size=2, max_size=2), st.sampled_from(asked)).map(b"".join),
        st.binary(max_size=60),
        st.sampled_from([b"\x00" * 4097, b"\x01" * 5000, b"\x02" * 4096]),
    )
    sent = draw(st.lists(st.tuples(st.integers(0, 2), datagram), max_size=12))
    return cache, sent


@needs_fast
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario=scenarios(), turn=st.integers(0, 10**6), size=st.integers(1, 8))
def test_the_twins_give_the_same_replies_drops_turns_and_misses(
    net: Net, scenario: Any, turn: int, size: int
) -> None:
    cache, sent = scenario
    results = []
    for impl in (pure, fast):
        net.send(sent)
        results.append(serve(impl, net, cache, turn, size))
        net.drain()
    assert results[0] == results[1]
