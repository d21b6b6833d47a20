"""The CNI commands over the service with the shells' fakes (tests/core/fakes.py): what each
command asks of the service, the codes of the service's errors, concurrency; in milliseconds
(the real kernel, engines and plugins are in tests/e2e/test_cni*.py)."""

from __future__ import annotations

import json
from typing import Any

import trio

from agent.frontends.cni.commands import CREATED_LABEL, execute
from agent.service import Service

CONF = {"cniVersion": "1.1.0", "name": "pods", "type": "netagent"}


async def run(svc: Service, command: str, conf: dict[str, Any], container: str = "",
              netns: str = "", ifname: str = "eth0") -> tuple[int, Any]:  # fmt: skip
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname}  # fmt: skip
    status, out = await execute(svc, {k: v for k, v in env.items() if v}, json.dumps(conf).encode())
    return status, None if out is None else json.loads(out)


async def test_concurrent_first_adds_create_the_network_once(svc: Service) -> None:
    conf = dict(CONF, subnet="10.50.0.0/24")
    results: list[tuple[int, Any]] = []

    async def add(i: int) -> None:
        results.append(await run(svc, "ADD", conf, f"c{i}", f"/run/netns/ok{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(add, i)
    assert [status for status, _ in results] == [0] * 8
    (net,) = [n for n in svc.networks.filter() if n.name == "pods"]
    assert net.subnet == "10.50.0.0/24" and net.labels == {CREATED_LABEL: "true"}
    assert len({out["ips"][0]["address"] for _, out in results}) == 8


async def test_del_is_idempotent_and_keeps_to_its_network(svc: Service) -> None:
    conf = dict(CONF, subnet="10.51.0.0/24")
    assert (await run(svc, "ADD", conf, "c1", "/run/netns/ok1"))[0] == 0
    other = dict(CONF, name="other", subnet="10.52.0.0/24")
    assert (await run(svc, "ADD", other, "c9", "/run/netns/ok9"))[0] == 0
    assert await run(svc, "DEL", other, "c1") == (0, None)  # not other's attachment
    assert svc.topo.endpoint_of_attachment("c1/eth0") is not None
    for _ in range(2):
        assert await run(svc, "DEL", conf, "c1") == (0, None)
    assert svc.topo.endpoint_of_attachment("c1/eth0") is None
    assert await run(svc, "DEL", dict(CONF, name="nosuch"), "c1") == (0, None)


async def test_gc_releases_only_unlisted_cni_attachments_of_its_network(svc: Service) -> None:
    conf = dict(CONF, subnet="10.53.0.0/24")
    for i in range(3):
        assert (await run(svc, "ADD", conf, f"c{i}", f"/run/netns/ok{i}"))[0] == 0
    valid = [{"containerID": "c1", "ifname": "eth0"}]
    assert await run(svc, "GC", dict(conf, **{"cni.dev/valid-attachments": valid})) == (0, None)
    assert {e.attachment for e in svc.endpoints.filter("pods")} == {"c1/eth0"}
    status, err = await run(svc, "GC", conf)
    assert (status, err["code"]) == (1, 7)
    assert {e.attachment for e in svc.endpoints.filter("pods")} == {"c1/eth0"}


async def test_service_errors_map_to_cni_codes(svc: Service) -> None:
    conf = dict(CONF, subnet="10.54.0.0/24")
    status, err = await run(svc, "ADD", conf, "c1", "/run/netns/missing")  # no such namespace
    assert (status, err["code"]) == (1, 3)
    assert (await run(svc, "ADD", conf, "c1", "/run/netns/ok1"))[0] == 0
    status, err = await run(svc, "ADD", conf, "c1", "/run/netns/ok1")  # the same attachment
    assert (status, err["code"]) == (1, 100)
    status, err = await run(svc, "ADD", dict(conf, subnet="10.55.0.0/24"), "c2", "/run/netns/ok2")
    assert (status, err["code"]) == (1, 7)  # the network exists with another subnet
    status, err = await run(svc, "ADD", dict(CONF, name="n2", subnet="10.54.0.0/25"), "c3",
                            "/run/netns/ok3")  # fmt: skip
    assert (status, err["code"]) == (1, 100)  # overlaps pods' subnet
    svc.shared.kernel.fail_attach = True  # type: ignore[attr-defined]
    status, err = await run(svc, "ADD", conf, "c4", "/run/netns/ok4")
    assert (status, err["code"]) == (1, 102)
    svc.shared.kernel.fail_attach = False  # type: ignore[attr-defined]
    await svc.lock.drain()  # agentd shutting down
    status, err = await run(svc, "ADD", conf, "c5", "/run/netns/ok5")
    assert (status, err["code"], err["cniVersion"]) == (1, 11, "1.1.0")


async def test_check_reads_the_kernel(svc: Service) -> None:
    conf = dict(CONF, subnet="10.56.0.0/24")
    status, result = await run(svc, "ADD", conf, "c1", "/run/netns/ok1")
    ep = svc.topo.endpoint_of_attachment("c1/eth0")
    assert ep is not None
    kernel: Any = svc.shared.kernel
    kernel.states[ep.host_ifname] = (True, 1)
    kernel.inside[("/run/netns/ok1", "eth0")] = ["10.56.0.2/24", "fe80::1/64"]
    checked = dict(conf, prevResult=result)
    assert await run(svc, "CHECK", checked, "c1", "/run/netns/ok1") == (0, None)
    kernel.inside[("/run/netns/ok1", "eth0")] = []
    status, err = await run(svc, "CHECK", checked, "c1", "/run/netns/ok1")
    assert (status, err["code"]) == (1, 104)
    del kernel.inside[("/run/netns/ok1", "eth0")]
    assert (await run(svc, "CHECK", checked, "c1", "/run/netns/ok1"))[1]["code"] == 104
    kernel.inside[("/run/netns/ok1", "eth0")] = ["10.56.0.2/24"]
    kernel.states[ep.host_ifname] = (False, 1)
    assert (await run(svc, "CHECK", checked, "c1", "/run/netns/ok1"))[1]["code"] == 104
    kernel.states[ep.host_ifname] = (True, 1)
    assert (await run(svc, "CHECK", checked, "c2", "/run/netns/ok1"))[1]["code"] == 104


async def test_status(svc: Service) -> None:
    status, err = await run(svc, "STATUS", CONF)  # ADD could not work: no such network
    assert (status, err["code"]) == (1, 50)
    assert await run(svc, "STATUS", dict(CONF, subnet="10.57.0.0/24")) == (0, None)  # it could
    assert (await run(svc, "ADD", dict(CONF, subnet="10.57.0.0/24"), "c1", "/run/netns/ok1"))[
        0
    ] == 0
    assert await run(svc, "STATUS", CONF) == (0, None)
