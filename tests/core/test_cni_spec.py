"""The CNI edge's pure part (`agent.frontends.cni.spec`): the order of the checks and their
codes, runtimeConfig conversion, results per version; a fuzz invariant: any input is parsed
or refused with a CniError, never anything else."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.model import Endpoint, Network, PortMapping
from agent.frontends.cni import spec
from agent.frontends.cni.spec import CniError

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0"}  # fmt: skip
CONF = {"cniVersion": "1.0.0", "name": "n", "type": "netagent"}


def _code(env: dict, conf: object) -> int:
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    with pytest.raises(CniError) as info:
        spec.parse(env, stdin)
    return info.value.code


CASES = [
    ("not JSON", ENV, b"{", 6),
    ("not an object", ENV, b"[]", 6),
    ("no version", ENV, {"name": "n"}, 1),
    ("unknown version", ENV, {**CONF, "cniVersion": "2.0.0"}, 1),
    ("version not a string", ENV, {**CONF, "cniVersion": 1}, 1),
    # the version is checked before the environment (a runtime's first question)
    ("bad version and env", {}, {**CONF, "cniVersion": "0.1.0"}, 1),
    ("no command", {}, CONF, 4),
    ("unknown command", {**ENV, "CNI_COMMAND": "add"}, CONF, 4),
    ("CHECK in 0.3.1", {**ENV, "CNI_COMMAND": "CHECK"}, {**CONF, "cniVersion": "0.3.1"}, 1),
    ("GC in 1.0.0", {"CNI_COMMAND": "GC"}, CONF, 1),
    ("STATUS in 1.0.0", {"CNI_COMMAND": "STATUS"}, CONF, 1),
    ("ADD without netns", {**ENV, "CNI_NETNS": ""}, CONF, 4),
    ("DEL without ifname", {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c"}, CONF, 4),
    ("bad container id", {**ENV, "CNI_CONTAINERID": "-x"}, CONF, 4),
    ("bad ifname", {**ENV, "CNI_IFNAME": "a/b"}, CONF, 4),
    ("relative netns", {**ENV, "CNI_NETNS": "x"}, CONF, 4),
    ("bad field type", ENV, {**CONF, "ipv6": "yes"}, 7),
    ("bad runtimeConfig", ENV, {**CONF, "runtimeConfig": {"portMappings": [{"hostPort": 1}]}}, 7),
    ("no network name", ENV, {**CONF, "name": ""}, 7),
]


@pytest.mark.parametrize(("why", "env", "conf", "code"), CASES, ids=[c[0] for c in CASES])
def test_refusals(why: str, env: dict, conf: object, code: int) -> None:
    assert _code(env, conf) == code


def test_a_call_read() -> None:
    conf = {**CONF, "network": "agentnet", "unknownField": [1],
            "runtimeConfig": {"ips": ["10.0.0.5/24", "fd00::5"], "mac": "02:00:00:00:00:05",
                              "portMappings": [{"hostPort": 80, "containerPort": 8080,
                                                "protocol": "UDP", "hostIP": "127.0.0.1"},
                                               {"hostPort": 81, "containerPort": 81,
                                                "hostIP": "::1"}]}}  # fmt: skip
    call = spec.parse(ENV, json.dumps(conf).encode())
    assert (call.command, call.version, call.attachment) == ("ADD", "1.0.0", "c1/eth0")
    assert call.conf.network_name == "agentnet"
    assert spec.static_ips(call.conf) == ("10.0.0.5", "fd00::5")
    assert spec.port_mappings(call.conf) == (
        PortMapping(protocol="tcp", host_port=81, container_port=81, host_ip="::1"),
        PortMapping(protocol="udp", host_port=80, container_port=8080, host_ip="127.0.0.1"),
    )
    valid = [{"containerID": "a", "ifname": "eth0"}]
    gc_conf = {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": valid}
    gc = spec.parse({"CNI_COMMAND": "GC"}, json.dumps(gc_conf).encode())
    assert [(a.container_id, a.ifname) for a in gc.conf.valid_attachments or []] == [("a", "eth0")]


@pytest.mark.parametrize("ips", [["10.0.0.1", "10.0.0.2"], ["nonsense"]])
def test_static_ips_refused(ips: list[str]) -> None:
    call = spec.parse(ENV, json.dumps({**CONF, "runtimeConfig": {"ips": ips}}).encode())
    with pytest.raises(CniError) as info:
        spec.static_ips(call.conf)
    assert info.value.code == 7


def test_colliding_port_mappings_refused() -> None:
    pm = {"hostPort": 80, "containerPort": 80}
    call = spec.parse(
        ENV, json.dumps({**CONF, "runtimeConfig": {"portMappings": [pm, pm]}}).encode()
    )
    with pytest.raises(CniError) as info:
        spec.port_mappings(call.conf)
    assert info.value.code == 7


NET = Network(id="a" * 64, name="n", bridge="br-aaaaaaaaaaaa", subnet="10.1.0.0/16",
              gateway="10.1.0.1", ipv6=True, subnet6="fd00:1::/64",
              gateway6="fd00:1::1")  # fmt: skip
EP = Endpoint(id="b" * 64, network_id="a" * 64, netns="/run/netns/x", netns_key="1:2",
              ifname="eth0", host_ifname="nabbbbbbbbbbbbb", ip="10.1.0.2", ip6="fd00:1::2",
              mac="02:42:0a:01:00:02", default_route=True, attachment="c1/eth0")  # fmt: skip


@pytest.mark.parametrize("version", spec.VERSIONS)
def test_add_result_per_version(version: str) -> None:
    call = spec.parse(ENV, json.dumps({**CONF, "cniVersion": version}).encode())
    result = spec.add_result(call, NET, EP)
    assert result["cniVersion"] == version
    assert result["interfaces"] == [
        {"name": "nabbbbbbbbbbbbb"},
        {"name": "eth0", "mac": "02:42:0a:01:00:02", "sandbox": "/run/netns/x"},
    ]
    ips = [{"address": "10.1.0.2/16", "gateway": "10.1.0.1", "interface": 1},
           {"address": "fd00:1::2/64", "gateway": "fd00:1::1", "interface": 1}]  # fmt: skip
    if version < "1.0.0":
        ips = [{"version": "4", **ips[0]}, {"version": "6", **ips[1]}]
    assert result["ips"] == ips
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"},
                                {"dst": "::/0", "gw": "fd00:1::1"}]  # fmt: skip


def test_no_default_route_when_the_endpoint_does_not_hold_it() -> None:
    call = spec.parse(ENV, json.dumps(CONF).encode())
    ep = Endpoint(**{**{f: getattr(EP, f) for f in EP.__struct_fields__}, "default_route": False})
    assert spec.add_result(call, NET, ep)["routes"] == []


def test_prev_addresses() -> None:
    call = spec.parse({**ENV, "CNI_COMMAND": "CHECK"}, json.dumps(CONF).encode())
    result = spec.add_result(call, NET, EP)
    checked = spec.parse({**ENV, "CNI_COMMAND": "CHECK"},
                         json.dumps({**CONF, "prevResult": result}).encode())  # fmt: skip
    assert spec.prev_addresses(checked) == {"10.1.0.2/16", "fd00:1::2/64"}
    for prev, code in (({"interfaces": []}, 104), ({"interfaces": 5}, 7)):
        bad = spec.parse({**ENV, "CNI_COMMAND": "CHECK"},
                         json.dumps({**CONF, "prevResult": prev}).encode())  # fmt: skip
        with pytest.raises(CniError) as info:
            spec.prev_addresses(bad)
        assert info.value.code == code


def test_error_and_version_documents() -> None:
    assert spec.error_doc("1.0.0", CniError(7, "m", "d")) == {
        "cniVersion": "1.0.0", "code": 7, "msg": "m", "details": "d"}  # fmt: skip
    assert spec.error_doc("1.0.0", CniError(7, "m")) == {"cniVersion": "1.0.0", "code": 7,
                                                          "msg": "m"}  # fmt: skip
    assert spec.version_doc("0.4.0")["supportedVersions"] == list(spec.VERSIONS)
    assert spec.version_of(b"garbage") == spec.version_of(b'{"cniVersion": 3}') == "1.1.0"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["", "x", "10.0.0.0/24", "-1"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
        st.sampled_from(["hostPort", "containerPort", "ips", "interfaces", "mac", "x"]), inner,
        max_size=2),
    max_leaves=4,
)  # fmt: skip
confs = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from([*spec.VERSIONS, "0.1.0", ""])},
    optional={k: json_values for k in ("name", "network", "runtimeConfig", "prevResult", "mtu",
                                        "ipv6", "subnet", "cni.dev/valid-attachments")},
)  # fmt: skip
envs = st.fixed_dictionaries(
    {}, optional={k: st.sampled_from(["", "ADD", "DEL", "CHECK", "GC", "c1", "/run/netns/x",
                                      "eth0", "../x"])
                  for k in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")},
)  # fmt: skip


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # 2 shared cores
@given(envs, st.one_of(confs.map(lambda c: json.dumps(c).encode()), st.binary(max_size=40)))
def test_fuzz_parses_or_refuses(env: dict[str, str], stdin: bytes) -> None:
    try:
        call = spec.parse(env, stdin)
    except CniError as exc:
        assert exc.code in (1, 4, 6, 7) and exc.msg
        return
    assert call.command in spec.COMMANDS and call.version in spec.VERSIONS
    for step in (spec.static_ips, spec.port_mappings):
        try:
            step(call.conf)
        except CniError as exc:
            assert exc.code == 7


def test_add_result_after_another_plugin_keeps_its_result_first() -> None:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo0", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "192.168.9.9/32", "interface": 0}],
            "routes": [{"dst": "192.168.0.0/16"}],
            "dns": {"nameservers": ["192.168.9.1"]}}  # fmt: skip
    call = spec.parse(ENV, json.dumps({**CONF, "prevResult": prev}).encode())
    result = spec.add_result(call, NET, EP)
    assert [i["name"] for i in result["interfaces"]] == ["lo0", "nabbbbbbbbbbbbb", "eth0"]
    assert [(ip["address"], ip["interface"]) for ip in result["ips"]] == [
        ("192.168.9.9/32", 0), ("10.1.0.2/16", 2), ("fd00:1::2/64", 2)]  # fmt: skip
    assert result["routes"][0] == {"dst": "192.168.0.0/16"} and len(result["routes"]) == 3
    assert result["dns"] == {"nameservers": ["192.168.9.1"]}


def test_add_result_names_the_gateways_as_nameservers_when_the_network_has_names() -> None:
    call = spec.parse(ENV, json.dumps(CONF).encode())
    assert NET.dns and not NET.is_default
    assert spec.add_result(call, NET, EP)["dns"] == {"nameservers": ["10.1.0.1", "fd00:1::1"]}
    off = msgspec.structs.replace(NET, dns=False)
    assert spec.add_result(call, off, EP)["dns"] == {}
