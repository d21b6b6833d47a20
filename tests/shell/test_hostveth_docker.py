"""Docker's Join path of the kernel shell (`kernel.attach_host`, `agent.kernel.hostveth`)
against the real kernel (private netns), checked with `ip -j`: both ends in the host
namespace, the host end an up port of the bridge with our alias, the peer down with its MAC
and MTU, ready for an engine to move; all or nothing."""

from __future__ import annotations

import subprocess

import pytest

from agent.core.errors import Conflict, NotFound
from tests.shell.test_links import (
    GROUP,
    endpoint,
    ip_json,
    kernel,  # noqa: F401 (fixture)
    link,
    make_bridge,
    scratch,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.kernel


async def test_attach_host_makes_both_ends_here(kernel, scratch):  # noqa: F811
    bridge = await make_bridge(kernel, scratch)
    host, peer = scratch.name("tvh"), scratch.name("tvp")
    spec = endpoint(bridge, host, 7, "/proc/self/ns/net", ifname=peer)
    assert await kernel.attach_host(spec) is True
    h, p = link(host), link(peer)
    assert h is not None and p is not None  # both in this (the host) namespace
    assert h["master"] == bridge and "UP" in h["flags"] and h["mtu"] == spec.mtu
    assert h["ifalias"] == spec.alias and h["group"] == GROUP
    assert "UP" in link(bridge)["flags"]
    assert p["address"] == spec.mac and p["mtu"] == spec.mtu and "UP" not in p["flags"]
    assert p["linkinfo"]["info_kind"] == "veth" and p.get("group", "default") == "default"
    assert ip_json("addr", "show", "dev", peer)[0]["addr_info"] == []  # Docker configures it
    for end in (h, p):
        assert (end["num_tx_queues"], end["num_rx_queues"]) == (1, 1)
    # an engine moves the peer away; deleting the host end deletes it there too
    ns = scratch.ip_netns()
    subprocess.run(["ip", "link", "set", peer, "netns", ns.rsplit("/", 1)[1]], check=True)
    assert link(peer) is None and link(peer, ns=ns) is not None
    assert await kernel.detach(host) is True
    assert link(peer, ns=ns) is None


async def test_attach_host_refusals_leave_nothing(kernel, scratch):  # noqa: F811
    bridge = await make_bridge(kernel, scratch)
    host, peer = scratch.name("tvh"), scratch.name("tvp")
    await kernel.attach_host(endpoint(bridge, host, 8, "/proc/self/ns/net", ifname=peer))
    before = {x["ifname"] for x in ip_json("link", "show")}
    other = scratch.name("tvh")
    with pytest.raises(Conflict, match=peer):  # the peer's name is taken
        await kernel.attach_host(endpoint(bridge, other, 9, "/proc/self/ns/net", ifname=peer))
    with pytest.raises(Conflict, match=host):  # the host end's name is taken
        await kernel.attach_host(
            endpoint(bridge, host, 9, "/proc/self/ns/net", ifname=scratch.name("tvp"))
        )
    with pytest.raises(NotFound, match="bridge"):
        await kernel.attach_host(
            endpoint("nobridge0", other, 9, "/proc/self/ns/net", ifname=scratch.name("tvp"))
        )
    assert {x["ifname"] for x in ip_json("link", "show")} == before
