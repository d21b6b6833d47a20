"""Ownership marks: every record round-trips through its alias (what fits), every alias fits
in the kernel's 255 bytes, and anything that is not a mark of ours decodes to None."""

from __future__ import annotations

import ipaddress

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import marks, naming
from agent.core.model import Endpoint, Network, PortMapping

HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
IFNAME = st.from_regex(r"eth[0-9]{1,3}|[a-z][a-z0-9]{0,14}", fullmatch=True)
V4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
V6 = st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
LABELS = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=4)


@st.composite
def networks(draw) -> Network:
    prefix = draw(st.integers(8, 30))
    subnet = ipaddress.IPv4Network((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
    ipv6 = draw(st.booleans())
    subnet6 = ipaddress.IPv6Network((draw(st.integers(0, 2**128 - 1)), 64), strict=False)
    ip_range = draw(st.none() | st.just(str(next(subnet.subnets(new_prefix=min(prefix + 1, 32))))))
    return Network(
        id=draw(HEX64), name=draw(NAME), bridge="br-" + draw(HEX64)[:12], subnet=str(subnet),
        gateway=str(subnet.network_address + 1), ip_range=ip_range,
        internal=draw(st.booleans()), icc=draw(st.booleans()), masquerade=draw(st.booleans()),
        mtu=draw(st.integers(68, 65535)), labels=draw(LABELS), aux_addresses={},
        is_default=draw(st.booleans()), ipv6=ipv6,
        subnet6=str(subnet6) if ipv6 else None,
        gateway6=str(subnet6.network_address + 1) if ipv6 else None,
        created=float(draw(st.integers(0, 2**32))), dns=draw(st.booleans()),
    )  # fmt: skip


PORTS = st.lists(
    st.builds(
        PortMapping,
        protocol=st.sampled_from(["tcp", "udp"]),
        host_port=st.integers(1, 65535),
        container_port=st.integers(1, 65535),
        host_ip=st.just("") | V4,
    ),
    max_size=12,
    unique=True,
).map(lambda ps: tuple(sorted(ps)))


@st.composite
def endpoints(draw) -> Endpoint:
    sandbox = draw(st.booleans())
    name = draw(st.from_regex(r"[a-z][a-z0-9-]{0,40}", fullmatch=True))
    paths = [f"/run/netns/{name}", f"/proc/{len(name)}1/ns/net", "/var/run/x"]
    netns = paths[0] if sandbox else draw(st.sampled_from(paths))
    mac = draw(st.binary(min_size=6, max_size=6))
    return Endpoint(
        id=draw(HEX64), network_id=draw(HEX64), netns=netns,
        netns_key=f"{draw(st.integers(0, 2**20))}:{draw(st.integers(0, 2**32))}",
        ifname=draw(IFNAME), host_ifname="na" + draw(HEX64)[:13], ip=draw(V4),
        mac=":".join(f"{b:02x}" for b in mac), sandbox=name if sandbox else None,
        default_route=draw(st.booleans()), ports=draw(PORTS), ip6=draw(st.none() | V6),
        attachment=draw(st.just("") | st.from_regex(r"[0-9a-f]{64}/eth0", fullmatch=True)),
        aliases=tuple(draw(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True),
                                    max_size=4))),
    )  # fmt: skip


@settings(max_examples=150)
@given(networks())
def test_a_network_round_trips_through_its_bridge_mark(net: Network) -> None:
    alias = marks.network_mark(net)
    assert len(alias.encode()) <= marks.ALIAS_MAX
    assert naming.parse_alias(alias) == ("net", net.id)
    kind, ident, mark = marks.decode(alias)
    assert (kind, ident) == ("net", net.id) and isinstance(mark, marks.NetMark)
    back = marks.network_of(ident, net.bridge, mark)
    if mark.flags & marks.INCOMPLETE:  # labels (and maybe the creation time) did not fit
        assert net.labels and back.labels == {}
        net = msgspec.structs.replace(net, labels={}, created=back.created)
    assert back == net


@settings(max_examples=150)
@given(endpoints())
def test_an_endpoint_round_trips_through_its_veth_mark(ep: Endpoint) -> None:
    alias = marks.endpoint_mark(ep)
    assert len(alias.encode()) <= marks.ALIAS_MAX
    assert naming.parse_alias(alias) == ("ep", ep.id)
    _, ident, mark = marks.decode(alias)
    assert isinstance(mark, marks.EpMark) and mark.network == bytes.fromhex(ep.network_id[:12])
    back = marks.endpoint_of(ident, ep.network_id, ep.host_ifname, mark)
    if mark.flags & marks.EP_INCOMPLETE:  # the attachment key, ports, aliases dropped to fit
        assert back.attachment in ("", ep.attachment)
        assert back.ports == ep.ports[: len(back.ports)]
        assert back.aliases == ep.aliases[: len(back.aliases)]
        assert len(back.aliases) == len(ep.aliases) or not back.ports
        ep = msgspec.structs.replace(
            ep, attachment=back.attachment, ports=back.ports, aliases=back.aliases
        )
    assert back == ep


def test_a_usual_endpoint_keeps_everything_and_a_usual_network_its_labels() -> None:
    ep = Endpoint(
        id="a" * 64, network_id="b" * 64, netns="/run/netns/web-frontend-1",
        netns_key="4:4026532412",
        ifname="eth0", host_ifname="na" + "a" * 13, ip="172.18.0.2", mac="02:42:ac:12:00:02",
        default_route=True, ip6="fd4e:1234:5678:1::2",
        ports=tuple(
            PortMapping(protocol="tcp", host_port=8000 + i, container_port=80) for i in range(4)
        ),
    )  # fmt: skip
    mark = marks.decode(marks.endpoint_mark(ep))[2]
    assert isinstance(mark, marks.EpMark) and not mark.flags & marks.EP_INCOMPLETE
    net = Network(
        id="b" * 64, name="frontend", bridge="br-" + "b" * 12, subnet="172.18.0.0/16",
        gateway="172.18.0.1", labels={"com.example.team": "web"}, created=1_800_000_000.0,
    )  # fmt: skip
    back = marks.decode(marks.network_mark(net))[2]
    assert isinstance(back, marks.NetMark) and back.labels == {"com.example.team": "web"}


def test_aliases_that_are_not_marks_of_ours_decode_to_none_or_to_no_payload() -> None:
    ident = "c" * 64
    assert marks.decode(None) is None
    assert marks.decode("") is None
    assert marks.decode("docker0") is None
    assert marks.decode(f"netagent:vlan:{ident}") is None
    assert marks.decode(f"netagent:net:{ident[:-1]}") is None
    assert marks.decode(naming.bridge_alias(ident)) == ("net", ident, None)  # before payloads
    assert marks.decode(f"{naming.veth_alias(ident)}:!!not base64") == ("ep", ident, None)
    assert marks.decode(f"{naming.veth_alias(ident)}:AAAA") == ("ep", ident, None)


@given(st.text(max_size=300))
def test_decoding_any_text_returns_none_or_a_mark_never_raises(text: str) -> None:
    for alias in (text, f"netagent:net:{'d' * 64}:{text}", f"netagent:ep:{'d' * 64}:{text}"):
        got = marks.decode(alias)
        assert got is None or got[2] is None or isinstance(got[2], marks.NetMark | marks.EpMark)
