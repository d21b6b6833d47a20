"""The event decoder's twins on real notifications from this kernel (root, private namespace):
a bridge, a veth and addresses come and go, the datagrams are captured, and both twins decode
them, as they are and mutated, to the same events (the pure-input cases are in
tests/core/test_nlevents.py)."""

from __future__ import annotations

import socket
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import nlevents as pure
from agent.core.naming import LINK_GROUP
from agent.core.nlevents import AddrEvent, LinkEvent
from tests.core.test_nlevents import ALIAS, FILTERS, fast, mutated, outcome


# --- real messages from this kernel ---------------------------------------------------------
def _sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True)


@pytest.fixture
def captured() -> list[bytes]:
    """Datagrams this kernel sends while a bridge, a veth and addresses come and go.

    Function-scoped on purpose: the autouse kernel guard (function scope) must run first.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
    sock.bind((0, 0x1 | 0x10 | 0x100))
    try:
        _sh(
            "ip link add nlcap0 group 0x4e41 type bridge && ip link set nlcap0 up"
            f" alias {ALIAS} && ip addr add 10.77.0.1/24 dev nlcap0"
            " && ip addr add fd77::1/64 dev nlcap0 nodad"
            " && ip link add nlcap1 group 0x4e41 type veth peer name nlcap2"
            " && ip link set nlcap1 master nlcap0 up && ip link set nlcap2 up"
            " && ip link del nlcap1 && ip addr del 10.77.0.1/24 dev nlcap0"
            " && ip link del nlcap0"
        )
        sock.settimeout(5)  # read until the bridge's own RTM_DELLINK, the last change
        datagrams: list[bytes] = []
        while not datagrams or not any(
            e.action == "del" and getattr(e, "name", "") == "nlcap0"
            for e in pure.decode(datagrams[-1])
        ):
            datagrams.append(sock.recv(1 << 16))
        return datagrams
    finally:
        sock.close()


@pytest.mark.kernel
def test_captured_messages_twins_agree(captured: list[bytes]) -> None:
    assert len(captured) > 10
    events = [e for d in captured for e in pure.decode(d)]
    for datagram in captured:
        for args in [(), (LINK_GROUP, None), (None, {1})]:
            assert outcome(pure, datagram, *args) == outcome(fast or pure, datagram, *args)
    names = {e.name for e in events if isinstance(e, LinkEvent)}
    assert {"nlcap0", "nlcap1", "nlcap2"} <= names
    assert ("del", "nlcap0") in {(e.action, e.name) for e in events if isinstance(e, LinkEvent)}
    addrs = {(e.action, e.address) for e in events if isinstance(e, AddrEvent)}
    assert {("new", "10.77.0.1"), ("del", "10.77.0.1"), ("new", "fd77::1")} <= addrs


@pytest.mark.kernel
@given(data=st.data())
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_captured_messages_mutated_twins_agree(captured: list[bytes], data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(captured))
    buf = data.draw(mutated(base))
    args = data.draw(FILTERS)
    assert outcome(pure, buf, *args) == outcome(fast or pure, buf, *args)
