"""Chaining: netagent's result is a valid prevResult for the reference plugins that follow it
(Debian's containernetworking-plugins: tuning, portmap, firewall, bandwidth), run as a
runtime runs a conflist, in agentd's host namespace; then DEL in reverse order."""

from __future__ import annotations

import json

import pytest

from tests.e2e import cni_harness as ch
from tests.e2e import traffic
from tests.e2e.harness import add_outside, links, ns_exec, running_host, sh, unique

pytestmark = pytest.mark.kernel

PLUGINS = "/usr/lib/cni"
PORTS = {"portMappings": [{"hostPort": 9090, "containerPort": 90, "protocol": "tcp"}]}
CHAIN = [
    ("tuning", {"mtu": 1400, "sysctl": {"net.ipv4.conf.eth0.rp_filter": "0"}}),
    ("portmap", {"capabilities": {"portMappings": True}, "runtimeConfig": PORTS}),
    ("firewall", {"backend": "iptables"}),
    ("bandwidth", {"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
                   "egressRate": 100_000_000, "egressBurst": 1_000_000}),
]  # fmt: skip


def test_reference_plugins_chain_after_netagent() -> None:
    with running_host() as host:
        host.call("network.create", name="chain", subnet="10.75.0.0/24")
        bridge = host.call("network.inspect", network="chain")["network"]["bridge"]
        outside, host_ip, outside_ip = add_outside(host)
        name = unique("ctr")
        sh("ip", "netns", "add", name)
        ids = {"container": "chain1", "netns": f"/run/netns/{name}", "ifname": "eth0",
               "host_ns": host.name}  # fmt: skip
        try:
            rc, ours = ch.call(ch.NATIVE, "ADD", ch.conf(host.socket, "chain"), **ids)
            assert rc == 0, ours
            prev, confs = ours, []
            for plugin, fields in CHAIN:
                conf = {"cniVersion": "1.0.0", "name": "chain", "type": plugin, **fields}
                rc, result = ch.call(f"{PLUGINS}/{plugin}", "ADD", dict(conf, prevResult=prev),
                                     **ids)  # fmt: skip
                assert rc == 0, (plugin, result)
                # what netagent put there went through every plugin unchanged
                assert result["interfaces"][:2] == ours["interfaces"], plugin
                assert [{k: ip[k] for k in sorted(ip)} for ip in result["ips"]] == [
                    {k: ip[k] for k in sorted(ip)} for ip in ours["ips"]
                ], plugin
                prev = result
                confs.append(conf)
            assert [i["mtu"] for i in links(name) if i["ifname"] == "eth0"] == [1400]  # tuning
            assert any(i["ifname"].startswith("bwp") for i in links(host.name))  # bandwidth
            # portmap's DNAT into an agent bridge passes once the admin allows it in the
            # user chain (agentd never rewrites it): see README, "Chaining"
            if host.backend == "nftables":
                ns_exec(host.name, "nft", "insert", "rule", "inet", "netagent", "user",
                        "oifname", bridge, "ct", "status", "dnat", "accept")  # fmt: skip
            else:
                ns_exec(host.name, "iptables", "-I", "NETAGENT-USER", "-o", bridge, "-m",
                        "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT")  # fmt: skip
            with traffic.serve(name, tcp=[90]):
                assert traffic.tcp(outside, host_ip, 9090) == outside_ip
            # CHECK through netagent with the final result, then DEL in reverse order
            checked = dict(ch.conf(host.socket, "chain"), prevResult=prev)
            assert ch.call(ch.NATIVE, "CHECK", checked, **ids) == (0, None)
            for conf in reversed(confs):
                rc, out = ch.call(f"{PLUGINS}/{conf['type']}", "DEL", dict(conf, prevResult=prev),
                                  **ids)  # fmt: skip
                assert rc == 0, (conf["type"], out)
            assert ch.call(ch.NATIVE, "DEL", checked, **ids) == (0, None)
            host.settle()
            assert host.call("endpoint.list") == []
            assert "CNI-DN-" not in host.iptables_save()
            assert json.dumps(prev)  # a JSON document a runtime caches
        finally:
            sh("ip", "netns", "del", name, check=False)
            sh("ip", "netns", "del", outside, check=False)
