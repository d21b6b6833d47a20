"""Golden rulesets: the exact iptables-restore text for every network option combination.

Each file holds `transaction.full` of two networks sharing one combination of internal x icc x
masquerade (`ports_*`: with published ports, TCP and UDP, any and one host address),
serialised (what `agentctl ruleset` shows and what start-up feeds iptables-restore), plus diff
transactions (network add/remove, port publish/unpublish). Regenerate after an intended change with:

    NETAGENT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/golden

then review the diff of the .rules files like code.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import msgspec
import pytest

from agent.core import naming, policy
from agent.core.model import Endpoint, Network, PortMapping
from agent.firewall.iptables import rules, transaction
from agent.firewall.iptables.serialize import serialize

HERE = Path(__file__).parent
UPDATE = os.environ.get("NETAGENT_UPDATE_GOLDEN") == "1"
COMBOS = list(itertools.product([False, True], repeat=3))


def network(n: int, *, internal: bool, icc: bool, masquerade: bool) -> Network:
    ident = (f"{n}a1b2c3d4e5f" * 6)[:64]
    return Network(
        id=ident,
        name=f"net{n}",
        bridge=naming.bridge_name(ident),
        subnet=f"172.{17 + n}.0.0/16",
        gateway=f"172.{17 + n}.0.1",
        internal=internal,
        icc=icc,
        masquerade=masquerade,
    )


def render(
    networks: list[Network], endpoints: list[Endpoint] | tuple[()] = (), family: int = 4
) -> rules.Ruleset:
    """The ruleset of one family, as the backend renders it: topology -> policy -> rules."""
    return rules.render(policy.build(networks, endpoints).family(family))


def check(name: str, text: str) -> None:
    path = HERE / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden file {name}: run with NETAGENT_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize(("internal", "icc", "masquerade"), COMBOS)
def test_full_ruleset(internal: bool, icc: bool, masquerade: bool) -> None:
    options = {"internal": internal, "icc": icc, "masquerade": masquerade}
    nets = [network(n, **options) for n in (1, 2)]
    name = f"full_internal-{int(internal)}_icc-{int(icc)}_masq-{int(masquerade)}.rules"
    check(name, serialize(transaction.full(render(nets))))


def test_diff_add_and_remove_network() -> None:
    base = [network(1, internal=False, icc=True, masquerade=True)]
    more = [*base, network(2, internal=False, icc=False, masquerade=True)]
    check("diff_add_network.rules", serialize(transaction.diff(render(base), render(more))))
    check("diff_remove_network.rules", serialize(transaction.diff(render(more), render(base))))


def published(net: Network, ip: str, *specs: tuple[str, int, int, str]) -> Endpoint:
    mappings = tuple(
        PortMapping(protocol=proto, host_port=hp, container_port=cp, host_ip=host_ip)
        for proto, hp, cp, host_ip in specs
    )
    return Endpoint(
        id=ip.replace(".", "").ljust(64, "0"),
        network_id=net.id,
        netns="/run/netns/c",
        netns_key="1:1",
        ifname="eth0",
        host_ifname="na0",
        ip=ip,
        mac="02:42:00:00:00:02",
        ports=mappings,
    )


@pytest.mark.parametrize(("internal", "icc", "masquerade"), COMBOS)
def test_full_ruleset_with_ports(internal: bool, icc: bool, masquerade: bool) -> None:
    options = {"internal": internal, "icc": icc, "masquerade": masquerade}
    nets = [network(n, **options) for n in (1, 2)]
    eps = [
        published(nets[0], "172.18.0.3", ("tcp", 8080, 80, ""), ("udp", 9090, 90, "127.0.0.1")),
        published(nets[1], "172.19.0.2", ("tcp", 8081, 80, "")),
    ]
    name = f"ports_internal-{int(internal)}_icc-{int(icc)}_masq-{int(masquerade)}.rules"
    check(name, serialize(transaction.full(render(nets, eps))))


def test_diff_publish_and_unpublish() -> None:
    net = network(1, internal=False, icc=True, masquerade=True)
    one = [published(net, "172.18.0.2", ("tcp", 8080, 80, ""))]
    two = [published(net, "172.18.0.2", ("tcp", 8080, 80, ""), ("udp", 5353, 53, "10.0.0.1"))]
    check("diff_publish.rules", serialize(transaction.diff(render([net], one), render([net], two))))
    check(
        "diff_unpublish_last.rules", serialize(transaction.diff(render([net], one), render([net])))
    )


def dual_stack(n: int, **options: bool) -> Network:
    base = network(n, **options)
    return msgspec.structs.replace(
        base, ipv6=True, subnet6=f"fd12:3456:789a:{n}::/64", gateway6=f"fd12:3456:789a:{n}::1"
    )


@pytest.mark.parametrize(("internal", "icc", "masquerade"), COMBOS)
def test_full_ipv6_ruleset_with_ports(internal: bool, icc: bool, masquerade: bool) -> None:
    """ip6tables: dual-stack networks only, IPv6 ports only where the host address allows."""
    options = {"internal": internal, "icc": icc, "masquerade": masquerade}
    nets = [dual_stack(1, **options), dual_stack(2, **options), network(3, **options)]
    specs = [("tcp", 8080, 80, ""), ("udp", 9090, 90, "fd00::1"), ("tcp", 7070, 70, "10.0.0.1")]
    eps = [
        msgspec.structs.replace(
            published(nets[0], "172.18.0.3", *specs), ip6="fd12:3456:789a:1::3"
        ),
        msgspec.structs.replace(
            published(nets[1], "172.19.0.2", ("tcp", 8081, 80, "")), ip6="fd12:3456:789a:2::2"
        ),
        published(nets[2], "172.20.0.2", ("tcp", 8082, 80, "")),  # IPv4-only network
    ]
    name = f"ipv6_internal-{int(internal)}_icc-{int(icc)}_masq-{int(masquerade)}.rules"
    check(name, serialize(transaction.full(render(nets, eps, family=6))))
    v4 = serialize(transaction.full(render(nets, eps)))
    assert "fd00::1" not in v4 and "fd12" not in v4 and ("8080" in v4) != internal


def test_no_stray_golden_files() -> None:
    expected = {
        f"{kind}_internal-{int(i)}_icc-{int(c)}_masq-{int(m)}.rules"
        for i, c, m in COMBOS
        for kind in ("full", "ports", "ipv6")
    } | {
        "diff_add_network.rules",
        "diff_remove_network.rules",
        "diff_publish.rules",
        "diff_unpublish_last.rules",
    }
    assert {p.name for p in HERE.glob("*.rules")} == expected
