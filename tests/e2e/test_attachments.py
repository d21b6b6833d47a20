"""What engines use: an endpoint reserved before its namespace exists (Docker's CreateEndpoint,
then Join), an interface name and an attachment key (a CNI plugin's CONTAINERID/IFNAME), a
removal by that key; checked on the real kernel and across a restart."""

from __future__ import annotations

import pytest

from agent.core import errors
from tests.e2e.harness import ipv4_of, ping, running_host, sh, unique

pytestmark = pytest.mark.kernel


def test_reserve_survives_a_restart_then_attach_and_remove_by_key() -> None:
    with running_host() as host:
        host.call("network.create", name="eng", subnet="10.61.0.0/24")
        reserved = host.call("endpoint.reserve", network="eng", attachment="ctr1/eth0")
        assert (reserved["netns"], reserved["ip"]) == ("", "10.61.0.2")
        assert not any(link["ifname"].startswith("na") for link in host.links())
        host.stop()
        host.start()  # the reservation is durable: its address stays taken
        other = host.call("endpoint.reserve", network="eng")
        assert other["ip"] == "10.61.0.3"
        ns = unique("att")
        sh("ip", "netns", "add", ns)
        try:
            joined = host.call("endpoint.attach", endpoint="ctr1/eth0", netns=ns, ifname="net0")
            assert (joined["id"], joined["ifname"]) == (reserved["id"], "net0")
            assert ipv4_of(ns, "net0") == ["10.61.0.2/24"]
            assert ping(ns, "10.61.0.1")  # the gateway, through the bridge
            with pytest.raises(errors.Conflict):
                host.call("endpoint.attach", endpoint="ctr1/eth0", netns=ns)
            gone = host.call("endpoint.remove", endpoint="ctr1/eth0")
            assert gone["id"] == reserved["id"]
            host.settle()
            assert ipv4_of(ns, "net0") == []
            assert host.call("endpoint.remove", endpoint="ctr1/eth0", force=True) is None
            with pytest.raises(errors.NotFound):
                host.call("endpoint.remove", endpoint="ctr1/eth0")
            host.call("endpoint.remove", endpoint=other["id"])  # a reservation only
            assert host.call("endpoint.list") == []
        finally:
            sh("ip", "netns", "del", ns, check=False)


def test_connect_with_an_interface_name_and_an_attachment_key() -> None:
    with running_host() as host:
        ns = unique("cni")
        sh("ip", "netns", "add", ns)
        try:
            ep = host.call("endpoint.connect", network="bridge", netns=ns, ifname="cni0",
                           attachment=f"{ns}/cni0")  # fmt: skip
            assert ep["ifname"] == "cni0" and ipv4_of(ns, "cni0") == [f"{ep['ip']}/16"]
            with pytest.raises(errors.Conflict):  # the same key twice
                host.call("endpoint.connect", network="bridge", netns=ns, attachment=f"{ns}/cni0")
            assert host.call("endpoint.remove", endpoint=f"{ns}/cni0")["id"] == ep["id"]
        finally:
            sh("ip", "netns", "del", ns, check=False)
