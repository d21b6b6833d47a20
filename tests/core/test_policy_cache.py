"""`policy.Builder` equals `policy.build` from scratch after any sequence of networks added,
removed and replaced (same id, other options), given as the same objects or as copies, with
or without endpoints publishing ports, and even with one id given twice."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import policy
from agent.core.model import Endpoint, Network, PortMapping

STEPS = st.lists(
    st.tuples(
        st.integers(0, 15),  # network
        st.sampled_from(["add", "remove", "copy", "twice"]),
        st.booleans(),  # internal
        st.booleans(),  # icc
        st.booleans(),  # IPv6
        st.integers(0, 3),  # endpoints publishing ports, 0-2 of them (3: none given at all)
    ),
    max_size=40,
)


def network(i: int, internal: bool, icc: bool, v6: bool) -> Network:
    return Network(id=f"{i:064x}", name=f"n{i}", bridge=f"br{i}", subnet=f"10.0.{i}.0/24",
                   gateway=f"10.0.{i}.1", internal=internal, icc=icc, ipv6=v6,
                   subnet6=f"fd00:{i:x}::/64" if v6 else None,
                   gateway6=f"fd00:{i:x}::1" if v6 else None)  # fmt: skip


def endpoints(nets: list[Network], count: int) -> list[Endpoint]:
    out = []
    for k, net in enumerate(nets[:count]):
        ports = (
            PortMapping(protocol="tcp", host_port=8000 + k, container_port=80),
            PortMapping(protocol="udp", host_port=9000 + k, container_port=53, host_ip="::1"),
        )
        out.append(Endpoint(id=f"{k:064x}", network_id=net.id, netns="/n", netns_key="1:2",
                            ifname="eth0", host_ifname=f"v{k}", ip=net.gateway[:-1] + "2",
                            mac="02:00:00:00:00:02", ports=ports,
                            ip6=net.gateway6[:-1] + "2" if net.gateway6 else None))  # fmt: skip
    return out


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_builder_equals_build_from_scratch(steps) -> None:
    builder = policy.Builder()
    nets: dict[str, Network] = {}
    for i, action, internal, icc, v6, ported in steps:
        net = network(i, internal, icc, v6)
        if action == "remove":
            nets.pop(net.id, None)
        elif action == "copy":  # every network given as an equal but new object
            nets = {k: network(int(k, 16), n.internal, n.icc, n.ipv6) for k, n in nets.items()}
        elif action == "add":
            nets[net.id] = net  # new, or the same id with other options
        given_nets = list(nets.values()) + ([net] if action == "twice" else [])
        eps = endpoints(given_nets, ported) if ported < 3 else []
        assert builder.build(given_nets, eps) == policy.build(given_nets, eps)
