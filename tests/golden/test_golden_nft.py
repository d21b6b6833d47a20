"""Golden nftables tables: the exact `nft list table inet netagent` text for every network
option combination (two dual-stack networks and an IPv4-only one, with published ports of
both families), plus the incremental scripts of a network add/remove and a port
publish/unpublish. Regenerate after an intended change with:

    NETAGENT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/golden

then review the diff of the tests/golden/nft/ files like code. tests/shell/test_nftables.py
loads each of these tables into the kernel and checks that it lists back identically.
"""

from __future__ import annotations

import msgspec
import pytest

from agent.core import policy
from agent.core.model import Endpoint, Network
from agent.firewall.nftables import render, script
from tests.golden.test_golden_rules import COMBOS, HERE, UPDATE, dual_stack, network, published

NFT = HERE / "nft"


def check(name: str, text: str) -> None:
    path = NFT / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden file {name}: run with NETAGENT_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def state(networks: list[Network], endpoints: list[Endpoint] | tuple[()] = ()) -> render.State:
    return render.render(policy.build(networks, endpoints))


def combo(internal: bool, icc: bool, masquerade: bool) -> render.State:
    """Two dual-stack networks and an IPv4-only one with this option combination, with ports
    of both families (any host address, an IPv4 one, an IPv6 one)."""
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
        published(nets[2], "172.20.0.2", ("tcp", 8082, 80, "")),
    ]
    return state(nets, eps)


def combo_name(internal: bool, icc: bool, masquerade: bool) -> str:
    return f"table_internal-{int(internal)}_icc-{int(icc)}_masq-{int(masquerade)}.nft"


@pytest.mark.parametrize(("internal", "icc", "masquerade"), COMBOS)
def test_table(internal: bool, icc: bool, masquerade: bool) -> None:
    check(combo_name(internal, icc, masquerade), script.listing(combo(internal, icc, masquerade)))


def test_diff_add_and_remove_network() -> None:
    base = [network(1, internal=False, icc=True, masquerade=True)]
    more = [*base, network(2, internal=False, icc=False, masquerade=True)]
    add = script.diff(state(base), state(more))
    check("diff_add_network.nft", "\n".join(add) + "\n")
    check("diff_remove_network.nft", "\n".join(script.diff(state(more), state(base))) + "\n")
    assert not any("flush" in line for line in add), "an added network rewrites nothing"


def test_diff_publish_and_unpublish() -> None:
    net = network(1, internal=False, icc=True, masquerade=True)
    one = [published(net, "172.18.0.2", ("tcp", 8080, 80, ""))]
    two = [published(net, "172.18.0.2", ("tcp", 8080, 80, ""), ("udp", 5353, 53, "10.0.0.1"))]
    publish = script.diff(state([net], one), state([net], two))
    check("diff_publish.nft", "\n".join(publish) + "\n")
    check("diff_unpublish_last.nft", "\n".join(script.diff(state([net], one), state([net]))) + "\n")
    assert all(line.startswith("add element") for line in publish), "ports change elements only"
