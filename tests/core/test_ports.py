"""Published ports: spec parsing, collisions, and the rules they render (pure)."""

from __future__ import annotations

import pytest

from agent.core import naming, policy, ports
from agent.core.errors import Conflict, InvalidArgument
from agent.core.model import Endpoint, Network, PortMapping
from agent.firewall.iptables import rules, transaction

NET_ID = "ab" * 32
NET = Network(
    id=NET_ID,
    name="n",
    bridge=naming.bridge_name(NET_ID),
    subnet="172.18.0.0/16",
    gateway="172.18.0.1",
)


def pm(hp: int, cp: int, proto: str = "tcp", host_ip: str = "") -> PortMapping:
    return PortMapping(protocol=proto, host_port=hp, container_port=cp, host_ip=host_ip)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", [pm(8080, 80)]),
        ("8080:80/udp", [pm(8080, 80, "udp")]),
        ("8080:80/TCP", [pm(8080, 80)]),
        ("127.0.0.1:9090:90/udp", [pm(9090, 90, "udp", "127.0.0.1")]),
        ("0.0.0.0:1:65535", [pm(1, 65535)]),
        (":8080:80", [pm(8080, 80)]),
        ("8000-8002:80-82", [pm(8000, 80), pm(8001, 81), pm(8002, 82)]),
        ("[FD00::0001]:53:53/udp", [pm(53, 53, "udp", "fd00::1")]),
    ],
)
def test_parse(spec: str, expected: list[PortMapping]) -> None:
    assert ports.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("0:80", "1 to 65535"),
        ("65536:80", "1 to 65535"),
        ("8080:99999", "1 to 65535"),
        ("8080:80/sctp", "unknown protocol"),
        ("8080:80/", "unknown protocol"),
        ("80", "expected [HOST_IP:]"),
        ("a:b:c:d", "invalid host address"),
        ("8080:", "expected [HOST_IP:]"),
        ("x:80", "invalid port"),
        ("999.1.1.1:80:80", "invalid host address"),
        ("::1:80:80", "invalid host address"),
        ("[::]:80:80", "cannot receive"),
        ("[10.0.0.1]:80:80", "invalid host address"),
        ("224.0.0.1:80:80", "cannot receive"),
        ("8000-8001:80", "differ in size"),
        ("8002-8000:80-82", "invalid port range"),
        ("1-2000:1-2000", "exceeds"),
    ],
)
def test_parse_refuses(spec: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words.replace("[", r"\[")):
        ports.parse(spec)


def test_collisions() -> None:
    any_ip, local = pm(8080, 80), pm(8080, 81, host_ip="127.0.0.1")
    assert ports.overlap(any_ip, local)
    assert ports.overlap(local, pm(8080, 82, host_ip="127.0.0.1"))
    assert not ports.overlap(local, pm(8080, 82, host_ip="10.0.0.1"))
    assert not ports.overlap(any_ip, pm(8080, 80, "udp"))
    with pytest.raises(Conflict, match=r"0\.0\.0\.0:8080/tcp is already published"):
        ports.check_free([local], [any_ip])
    ports.check_free([pm(8080, 80, "udp")], [any_ip])
    with pytest.raises(Conflict):
        ports.parse_all(["8080:80", "8079-8081:70-72"])
    assert ports.parse_all(["9:9/udp", "9:9"]) == [pm(9, 9), pm(9, 9, "udp")]
    assert ports.format_spec(local) == "127.0.0.1:8080->81/tcp"


def endpoint(ip: str, *mappings: PortMapping) -> Endpoint:
    return Endpoint(
        id=ip.replace(".", "") * 8,
        network_id=NET_ID,
        netns="/run/netns/x",
        netns_key="1:2",
        ifname="eth0",
        host_ifname="na1",
        ip=ip,
        mac="02:42:ac:12:00:02",
        ports=tuple(mappings),
    )


def render(networks: list[Network], endpoints: list[Endpoint] | tuple[()] = ()) -> rules.Ruleset:
    """The IPv4 ruleset, through the policy as the backend renders it."""
    return rules.render(policy.build(networks, endpoints).v4)


def test_render_published_ports() -> None:
    b = NET.bridge
    ep = endpoint("172.18.0.3", pm(8080, 80), pm(9090, 90, "udp", "127.0.0.1"))
    rs = render([NET], [ep])
    p_chain, h_chain = f"NETAGENT-P-{NET_ID[:12]}", f"NETAGENT-H-{NET_ID[:12]}"
    assert rs.chains("nat")["NETAGENT-DNAT"] == (("-j", p_chain),)
    assert rs.chains("nat")[p_chain] == (
        ("-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "DNAT",
         "--to-destination", "172.18.0.3:80"),
        ("-d", "127.0.0.1/32", "-p", "udp", "-m", "udp", "--dport", "9090", "-j", "DNAT",
         "--to-destination", "172.18.0.3:90"),
    )  # fmt: skip
    assert rs.chains("nat")[h_chain] == (
        ("-s", "127.0.0.0/8", "-j", "MASQUERADE"),
        ("-s", "172.18.0.3/32", "-d", "172.18.0.3/32", "-p", "tcp", "-m", "tcp",
         "--dport", "80", "-j", "MASQUERADE"),
        ("-s", "172.18.0.3/32", "-d", "172.18.0.3/32", "-p", "udp", "-m", "udp",
         "--dport", "90", "-j", "MASQUERADE"),
    )  # fmt: skip
    assert ("-o", b, "-j", h_chain) in rs.chains("nat")["NETAGENT-POSTROUTING"]
    own = rs.chains("filter")[naming.network_chain(NET_ID)]
    assert own[-1] == ("-o", b, "-j", "DROP")
    assert own[-3] == ("-d", "172.18.0.3/32", "!", "-i", b, "-o", b, "-p", "tcp", "-m", "tcp",
                       "--dport", "80", "-m", "conntrack", "--ctstate", "DNAT",
                       "-j", "NETAGENT-ACCEPT")  # fmt: skip
    # without ports, or on an internal network, nothing of this is rendered
    plain = render([NET])
    assert render([NET], [endpoint("172.18.0.3")]) == plain
    internal = render([NET.__replace__(internal=True)], [ep])
    assert p_chain not in internal.chains("nat")


def test_port_churn_touches_only_the_networks_chains() -> None:
    ep1 = endpoint("172.18.0.3", pm(8080, 80))
    ep2 = endpoint("172.18.0.3", pm(8080, 80), pm(8081, 81))
    script = transaction.diff(render([NET], [ep1]), render([NET], [ep2]))
    touched = {chain for t in script.tables for chain in t.declares}
    assert touched == {
        naming.network_chain(NET_ID),
        naming.ports_chain(NET_ID),
        naming.hairpin_chain(NET_ID),
    }
    assert all(op == "-A" for t in script.tables for op, _, _ in t.ops)
    # the last port going away removes both nat chains and their jumps
    gone = transaction.diff(render([NET], [ep1]), render([NET]))
    ops = [(op, chain) for t in gone.tables for op, chain, _ in t.ops]
    assert ("-D", "NETAGENT-DNAT") in ops and ("-X", naming.ports_chain(NET_ID)) in ops
