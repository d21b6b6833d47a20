"""Data path: throughput and RTT through each firewall backend, at 1 and at N networks.

Usage: .venv/bin/python bench/bench_dataplane.py [--networks 1000] [--seconds 2]
       [--pings 500] [--trials 20] [--backends iptables,nftables] [--quick] [--json PATH]
       [--create-only [--rounds 3]]

For each backend in turn (same machine, same run), one agentd (`--firewall KIND`, pool
10.0.0.0/8 cut in /24s) and an "outside" namespace behind an uplink veth (the host's upstream):
1. network `first` with containers a (publishing 15201->5201 and 17777->7777) and b;
2. three paths, each with iperf3 (TCP, `--seconds`, one stream) and an RTT: `ping -i 0.002`
   (`--pings` echoes, average) where ICMP goes, and a TCP request/response loop (1 byte each
   way, median of 2,000 round trips) on every path:
   - `out`: a -> outside namespace (masqueraded by the host),
   - `bridge`: a -> b on the same bridge,
   - `published`: outside -> host uplink address, published port -> a (DNAT);
3. network create and rm latency (`--trials` each, p50) with 1 network present;
4. `--networks` - 1 more networks are created; the last, `last`, gets containers too; the paths
   are measured again for `first` and for `last`, and create/rm latency at N networks.
Ratios (N networks / 1 network) per path say how a packet's cost grows with networks.
The transport comparison runs first: libnftables in process vs the `nft` tool, each sending
a network create's transaction and then its rm's (`script.diff`), on a table holding 1 and
`--networks` networks (p50 of 50 each).
`--create-only` skips the paths and the transports: network create/rm p50 only, at 1 and at
`--networks` networks, the backends alternated for `--rounds` rounds (medians of the rounds'
p50s), with no container.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any

import _common as c

from agent.frontends.jsonrpc import protocol as p

RR_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4); print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (data := conn.recv(1)):
        conn.sendall(data)
    conn.close()
"""

RR_CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
out = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); out.append(time.perf_counter() - t)
out.sort(); print(out[len(out) // 2] * 1e6)
"""


def nsx(ns: str, *cmd: str, timeout: float = 60) -> str:
    return c.sh("ip", "netns", "exec", ns, *cmd, timeout=timeout)


@contextmanager
def server(ns: str, *cmd: str):
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)  # iperf3 -s prints nothing until a client comes
        yield proc
    finally:
        proc.kill()
        proc.wait()


def iperf(src: str, ip: str, port: int, seconds: int) -> float:
    """Gbit/s received, one TCP stream from `src` to ip:port (an iperf3 server there)."""
    out = nsx(src, "iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-J", timeout=60)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_us(src: str, ip: str, count: int) -> float:
    out = nsx(src, "ping", "-q", "-i", "0.002", "-c", str(count), ip, timeout=60)
    avg = out.strip().splitlines()[-1].split("=")[1].split("/")[1]
    return float(avg) * 1000


def rr_us(src: str, ip: str, port: int, n: int = 2000) -> float:
    return float(nsx(src, sys.executable, "-c", RR_CLIENT, ip, str(port), str(n)))


class Bed:
    """One agentd with its outside namespace and the containers of the measured networks."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.agentd = c.Agentd(f"h-dp-{kind}", "--firewall", kind, "--pool", "10.0.0.0/8:24")
        self.agentd.start()
        self.client = self.agentd.client()
        self.host = self.agentd.host
        self.outside = f"o-dp-{kind}"
        c.sh("ip", "netns", "add", self.outside)
        c.sh("ip", "-n", self.host, "link", "add", "uplink0", "type", "veth", "peer", "name",
             "eth0", "netns", self.outside)  # fmt: skip
        c.sh("ip", "-n", self.host, "addr", "add", "192.168.99.1/24", "dev", "uplink0")
        c.sh("ip", "-n", self.host, "link", "set", "uplink0", "up")
        c.sh("ip", "-n", self.outside, "addr", "add", "192.168.99.2/24", "dev", "eth0")
        c.sh("ip", "-n", self.outside, "link", "set", "eth0", "up")
        c.sh("ip", "-n", self.outside, "link", "set", "lo", "up")
        self.host_ip, self.outside_ip = "192.168.99.1", "192.168.99.2"
        self.containers: dict[str, tuple[str, str, str, str]] = {}

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def network(self, name: str) -> None:
        """Network `name` with containers a (publishing two ports) and b."""
        self.client.call("network.create", p.NetworkCreate(name=name))
        ips = []
        for role in ("a", "b"):
            ns = f"{name}-{role}-{self.kind}"[:40]
            c.sh("ip", "netns", "add", ns)
            ports = ["15201:5201", "17777:7777"] if role == "a" else []
            if ports and name != "first":
                ports = ["25201:5201", "27777:7777"]
            ep = self.client.call(
                "endpoint.connect", {"network": name, "netns": ns, "ports": ports}
            )
            ips += [ns, ep["ip"]]
        self.containers[name] = (ips[0], ips[1], ips[2], ips[3])

    def paths(self, name: str, seconds: int, pings: int) -> dict[str, dict[str, float]]:
        a, _, b, b_ip = self.containers[name]
        port_iperf = 15201 if name == "first" else 25201
        port_rr = 17777 if name == "first" else 27777
        res: dict[str, dict[str, float]] = {}
        with server(self.outside, "iperf3", "-s", "-p", "5201"), \
                server(self.outside, sys.executable, "-c", RR_SERVER, "7777"):  # fmt: skip
            res["out"] = {
                "gbit_s": iperf(a, self.outside_ip, 5201, seconds),
                "ping_us": ping_us(a, self.outside_ip, pings),
                "rr_us": rr_us(a, self.outside_ip, 7777),
            }
        with server(b, "iperf3", "-s", "-p", "5201"), \
                server(b, sys.executable, "-c", RR_SERVER, "7777"):  # fmt: skip
            res["bridge"] = {
                "gbit_s": iperf(a, b_ip, 5201, seconds),
                "ping_us": ping_us(a, b_ip, pings),
                "rr_us": rr_us(a, b_ip, 7777),
            }
        with server(a, "iperf3", "-s", "-p", "5201"), \
                server(a, sys.executable, "-c", RR_SERVER, "7777"):  # fmt: skip
            res["published"] = {
                "gbit_s": iperf(self.outside, self.host_ip, port_iperf, seconds),
                "rr_us": rr_us(self.outside, self.host_ip, port_rr),
            }
        return res

    def create_rm(self, trials: int) -> dict[str, float]:
        create, remove = [], []
        for i in range(trials):
            t0 = time.perf_counter()
            self.client.call("network.create", p.NetworkCreate(name=f"cr{i}"))
            t1 = time.perf_counter()
            self.client.call("network.remove", p.NetworkRemove(network=f"cr{i}"))
            create.append(t1 - t0)
            remove.append(time.perf_counter() - t1)
            time.sleep(0.05)  # a removal's commit waits out the previous one's grace period
        return {
            "create_p50_ms": c.summarize(create)["p50"],
            "rm_p50_ms": c.summarize(remove)["p50"],
        }

    def fill(self, upto: int) -> float:
        t0 = time.perf_counter()
        for i in range(upto):
            self.client.call("network.create", p.NetworkCreate(name=f"fill{i}"))
        return time.perf_counter() - t0

    def close(self) -> None:
        c.sh("ip", "netns", "del", self.outside, check=False)
        for a, _, b, _ in self.containers.values():
            c.sh("ip", "netns", "del", a, check=False)
            c.sh("ip", "netns", "del", b, check=False)
        self.agentd.close()


def transports(trials: int, sizes: tuple[int, ...]) -> dict[str, float]:
    """p50 ms of a network create's transaction and of its rm's, per transport (libnftables in
    process, the `nft` tool), on a table already holding `sizes` networks."""
    from agent.core import naming, policy
    from agent.core.model import Network
    from agent.firewall.nftables import render, script
    from agent.firewall.nftables.transport import LibNftables, NftTool

    def net(i: int) -> Network:
        ident = f"{i:012x}" + "ab" * 26
        sub = f"10.{i // 256}.{i % 256}"
        return Network(id=ident, name=f"n{i}", bridge=naming.bridge_name(ident),
                       subnet=f"{sub}.0/24", gateway=f"{sub}.1")  # fmt: skip

    out: dict[str, float] = {}
    for size in sizes:
        nets = [net(i) for i in range(size)]
        base = render.render(policy.build(nets))
        more = render.render(policy.build([*nets, net(size)]))
        add = "\n".join(script.diff(base, more)) + "\n"
        rm = "\n".join(script.diff(more, base)) + "\n"
        lib, tool = LibNftables(), NftTool()
        lib.run("\n".join(script.full(base)) + "\n")
        for t in (lib, tool):
            adds, rms = [], []
            for _ in range(trials):
                t0 = time.perf_counter()
                t.run(add)
                t1 = time.perf_counter()
                t.run(rm)
                adds.append(t1 - t0)
                rms.append(time.perf_counter() - t1)
            out[f"{t.name}_create_p50_ms_at_{size}"] = c.summarize(adds)["p50"]
            out[f"{t.name}_rm_p50_ms_at_{size}"] = c.summarize(rms)["p50"]
        lib.run("delete table inet netagent\n")
    return out


def create_only(backends: list[str], networks: int, trials: int, rounds: int) -> None:
    """Network create/rm p50 at 1 and at `networks` networks, backends alternated per round."""
    got: dict[str, dict[str, list[float]]] = {k: {} for k in backends}
    for n in range(rounds):
        for kind in backends if n % 2 == 0 else backends[::-1]:
            with Bed(kind) as bed:
                bed.client.call("network.create", p.NetworkCreate(name="first"))
                one = bed.create_rm(trials)
                bed.fill(networks - 1)
                many = bed.create_rm(trials)
            for key, v in [*((f"{k}@1", x) for k, x in one.items()),
                           *((f"{k}@{networks}", x) for k, x in many.items())]:  # fmt: skip
                got[kind].setdefault(key, []).append(v)
            print(kind, f"round {n}:", one, many, flush=True)
    rows = []
    for key in got[backends[0]]:
        meds = [c.summarize([x / 1000 for x in got[k][key]])["p50"] for k in backends]
        rows.append((key, *meds, *(c.ratio(m, meds[0]) for m in meds[1:])))
    heads = ("p50 (median of rounds)", *backends, *(f"{k}/{backends[0]}" for k in backends[1:]))
    print(c.table(heads, rows))


def main() -> None:
    ap = c.base_parser("dataplane", __doc__)
    ap.add_argument("--networks", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=2)  # iperf3 -t (0: forever)
    ap.add_argument("--pings", type=int, default=500)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--backends", default="iptables,nftables")
    ap.add_argument("--create-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.create_only:
        c.isolate()
        create_only(args.backends.split(","), args.networks, args.trials, args.rounds)
        return
    if args.quick:
        args.networks, args.seconds, args.pings, args.trials = 20, 1, 50, 5
    c.isolate()
    sizes = (1, args.networks)
    results: dict[str, Any] = {"transport": transports(50 if not args.quick else 5, sizes)}
    print("transaction p50 ms:", results["transport"], flush=True)
    for kind in args.backends.split(","):
        bed = Bed(kind)
        try:
            r: dict[str, Any] = {}
            bed.network("first")
            r["one"] = {"first": bed.paths("first", args.seconds, args.pings)}
            r["one"].update(bed.create_rm(args.trials))
            r["fill_s"] = round(bed.fill(args.networks - 2), 2)
            bed.network("last")
            r["many"] = {
                "first": bed.paths("first", args.seconds, args.pings),
                "last": bed.paths("last", args.seconds, args.pings),
            }
            r["many"].update(bed.create_rm(args.trials))
            results[kind] = r
        finally:
            bed.close()
        print(kind, json.dumps(r), flush=True)
    rows = []
    for kind in args.backends.split(","):
        r = results[kind]
        one = r["one"]["first"]
        for path, m in one.items():
            for metric, v in m.items():
                first, last = r["many"]["first"][path][metric], r["many"]["last"][path][metric]
                ratios = (c.ratio(first, v), c.ratio(last, v))
                rows.append((kind, path, metric, v, first, last, *ratios))
        rows.append((kind, "network", "create_p50_ms", r["one"]["create_p50_ms"],
                     r["many"]["create_p50_ms"], None, None, None))  # fmt: skip
        rows.append((kind, "network", "rm_p50_ms", r["one"]["rm_p50_ms"], r["many"]["rm_p50_ms"],
                     None, None, None))  # fmt: skip
    heads = ("backend", "path", "metric", "1 net", f"{args.networks}: first", "last",
             "first/1", "last/1")  # fmt: skip
    print(c.table(heads, rows))
    c.write_json(args.json, "dataplane", args, results)


if __name__ == "__main__":
    main()
