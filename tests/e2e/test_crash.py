"""Crash safety: `kill -9` at random instants during heavy churn, then a restart converges.

Invariants after each restart: no address given twice, no leaked veth/bridge/rule, every
endpoint whose namespace still exists keeps its address and connectivity, endpoints whose
namespace vanished while agentd was down are released. Seeded, several trials.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import random
import signal
import threading
import time

import pytest

from agent.core.errors import AgentError
from agent.frontends.jsonrpc.client import Client
from tests.e2e.harness import Host, netns_names, ping, running_host, sh, unique

pytestmark = pytest.mark.kernel

CLIENTS = 8
NAMESPACES = 16


def churn(
    host: Host, namespaces: list[str], stop: threading.Event, seed: int
) -> collections.Counter:
    """Concurrent clients connecting/disconnecting namespaces and creating/removing networks."""
    outcomes: collections.Counter = collections.Counter()

    def worker(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        client = Client(host.socket, timeout=10)
        mine = namespaces[i::CLIENTS]
        while not stop.is_set():
            ns = rng.choice(mine)
            net = rng.choice(["bridge", "crash1", "crash2"])
            try:
                if rng.random() < 0.5:
                    client.call(
                        "endpoint.connect", _params("EndpointConnect", network=net, netns=ns)
                    )
                else:
                    client.call(
                        "endpoint.disconnect", _params("EndpointDisconnect", network=net, netns=ns)
                    )
                outcomes["ok"] += 1
            except AgentError as exc:
                outcomes[exc.kind] += 1
                if exc.kind == "unavailable":
                    return

    def networks() -> None:
        rng = random.Random(seed)
        client = Client(host.socket, timeout=10)
        while not stop.is_set():
            name = f"tmp{rng.randrange(3)}"
            try:
                if rng.random() < 0.5:
                    client.call("network.create", _params("NetworkCreate", name=name))
                else:
                    client.call(
                        "network.remove", _params("NetworkRemove", network=name, force=True)
                    )
                outcomes["ok"] += 1
            except AgentError as exc:
                outcomes[exc.kind] += 1
                if exc.kind == "unavailable":
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=networks))
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(15)
    return outcomes


def _collect(into: dict, *args) -> None:
    into.update(churn(*args))


def _params(kind: str, **kw):
    from agent.frontends.jsonrpc import protocol

    return getattr(protocol, kind)(**kw)


def check_invariants(host: Host) -> None:
    nets = {n["id"]: n for n in host.call("network.list", labels=[])}
    eps = host.call("endpoint.list")
    # no address given twice, every address inside its network
    per_net = collections.defaultdict(list)
    for ep in eps:
        per_net[ep["network_id"]].append(ep["ip"])
        assert ipaddress.ip_address(ep["ip"]) in ipaddress.ip_network(
            nets[ep["network_id"]]["subnet"]
        )
    for ips in per_net.values():
        assert len(ips) == len(set(ips)), f"address given twice: {sorted(ips)}"
    # kernel links: exactly the agent's bridges and veths, nothing leaked
    names = host.link_names()
    assert {n for n in names if n.startswith("na")} == {e["host_ifname"] for e in eps}
    bridges = {n["bridge"] for n in nets.values()}
    assert {n for n in names if n.startswith("br-") or n == "netagent0"} == bridges
    # inside each namespace: exactly the endpoints' addresses
    alive = netns_names()
    want = collections.defaultdict(set)
    for ep in eps:
        assert ep["netns"].removeprefix("/run/netns/") in alive
        want[ep["netns"].removeprefix("/run/netns/")].add(f"{ep['ip']}")
    for ns in alive:
        if not ns.startswith("crash-"):
            continue
        got = json.loads(sh("ip", "-n", ns, "-j", "addr").stdout)
        have = {a["local"] for link in got for a in link["addr_info"] if a["family"] == "inet"}
        assert have - {"127.0.0.1"} == want.get(ns, set()), ns
    # rules: every network has its chain once, nothing more; no duplicated line
    saved = host.iptables_save().splitlines()
    rules = [x for x in saved if x.startswith("-A") or (x.startswith("chain ") and ": " in x)]
    assert len(rules) == len(set(rules)), "duplicated rule"
    assert host.firewall_bridges() == {n["bridge"] for n in nets.values()}
    # connectivity between two endpoints of the same network
    for ips in per_net.values():
        if len(ips) >= 2:
            src = next(e for e in eps if e["ip"] == ips[0])
            assert ping(src["netns"].removeprefix("/run/netns/"), ips[1], wait=2)
            break


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_during_churn_converges(seed: int) -> None:
    rng = random.Random(seed)
    with running_host() as host:
        namespaces = [unique("crash-") for _ in range(NAMESPACES)]
        for ns in namespaces:
            sh("ip", "netns", "add", ns)
        try:
            host.ctl("network", "create", "crash1")
            host.ctl("network", "create", "--subnet", "10.77.0.0/24", "crash2")
            for trial in range(2):
                stop = threading.Event()
                result: dict = {}
                runner = threading.Thread(
                    target=_collect, args=(result, host, namespaces, stop, seed * 10 + trial)
                )
                runner.start()
                time.sleep(rng.uniform(0.3, 1.5))
                host.stop(signal.SIGKILL)
                stop.set()
                runner.join(30)
                assert result.get("ok", 0) > 0, result
                # a namespace vanishes while agentd is down
                victim = namespaces.pop(rng.randrange(len(namespaces)))
                sh("ip", "netns", "del", victim)
                host.start()
                check_invariants(host)
        finally:
            for ns in namespaces:
                sh("ip", "netns", "del", ns, check=False)


def test_sigterm_during_churn_answers_or_refuses_cleanly() -> None:
    with running_host() as host:
        namespaces = [unique("crash-") for _ in range(NAMESPACES)]
        for ns in namespaces:
            sh("ip", "netns", "add", ns)
        try:
            host.ctl("network", "create", "crash1")
            host.ctl("network", "create", "--subnet", "10.77.0.0/24", "crash2")
            stop = threading.Event()
            result: dict = {}
            runner = threading.Thread(
                target=lambda: result.update(churn(host, namespaces, stop, 7))
            )
            runner.start()
            time.sleep(1.0)
            assert host.stop(signal.SIGTERM) == 0
            stop.set()
            runner.join(30)
            # every request got an answer or a clean refusal; nothing unexpected
            assert set(result) <= {"ok", "busy", "unavailable", "conflict", "not_found"}, result
            host.start()
            check_invariants(host)
            log = host.log()
            assert "agentd.stopped" in log and "Traceback" not in log
        finally:
            for ns in namespaces:
                sh("ip", "netns", "del", ns, check=False)


def _worker_of(host: Host) -> int:
    """The pid of agentd's kernel worker (its only child)."""
    assert host.proc is not None
    pid = host.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        (child,) = (int(x) for x in f.read().split())
    with open(f"/proc/{child}/cmdline", "rb") as f:
        assert b"agent.kernel.worker" in f.read()
    return child


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True  # a zombie: dead, its parent not reaped yet
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_the_kernel_worker_dies_with_agentd() -> None:
    """kill -9 of agentd takes its kernel worker along: no job of the old agentd can run
    against the next one's adoption."""
    with running_host() as host:
        worker = _worker_of(host)
        host.stop(signal.SIGKILL)
        assert _gone(worker)
        host.start()  # and the next agentd has its own
        assert _worker_of(host) != worker


def test_agentd_stops_when_its_kernel_worker_dies_and_a_restart_converges() -> None:
    with running_host() as host:
        c = unique("wk-")
        try:
            host.ctl("run", c)
            (ep,) = json.loads(host.ctl("ps", "--json").stdout)
            os.kill(_worker_of(host), signal.SIGKILL)
            assert host.proc is not None
            assert host.proc.wait(10) != 0  # no kernel, no service: agentd stops
            host.proc = None
            assert "kernel.worker.exited" in host.log()
            host.start()
            (again,) = json.loads(host.ctl("ps", "--json").stdout)
            assert again["ip"] == ep["ip"] and again["netns"] == ep["netns"]
            assert ping(c, ep["ip"].rsplit(".", 1)[0] + ".1")
            check_invariants(host)
        finally:
            host.ctl("rm", c, check=False)
