"""DNS: agentd's embedded server against aardvark-dns (run by netavark), side by side.

Usage: .venv/bin/python bench/bench_dns.py [--seconds 5] [--rounds 3] [--quick] [--json P]
       [--queries 3000] [--fresh 20] [--server-only]

Everything runs in a private network namespace (`_common.isolate`). Two hosts are made there:
- `netagent`: agentd; a network `n1`; `run --name web` (the name asked) and a client namespace;
- `aardvark`: `netavark setup` of two containers on a network with `dns_enabled` (netavark
  starts /usr/lib/podman/aardvark-dns itself, as podman has it do; its config dir on a tmpfs);
  the first is `web`.
Measured, the contenders alternated round by round so machine noise hits both alike:
1. throughput: `dnsperf` from the client namespace, one name (`web A`) for `--seconds`,
   8 clients, 64 queries outstanding: queries per second, lost queries, average latency, and
   the server's CPU time per answered query (/proc/PID/stat of agentd / aardvark-dns: what
   the load of other processes on the machine changes least);
2. latency: a client sending one query at a time (3,000): p50 / p99 of the round trip;
3. first query: a new container is made (`sandbox.run` / `netavark setup`) and its name asked
   at once, the moment the call returns: how many first queries were answered with the new
   address, and how long from the return to the answer;
4. the cost of DNS for netagent: attach p50 (connect + disconnect, one at a time) and churn
   (16 clients, `bench_churn`'s loop) on a DNS-on network vs a DNS-off one, same agentd;
5. the wire library: dnslib vs dnspython, parse a query + build the A answer + pack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

NETAVARK = "/usr/lib/podman/netavark"
AARDVARK = "/usr/lib/podman/aardvark-dns"
NV_NET_ID = "d3b07384d113edec49eaa6238ad5ff00d3b07384d113edec49eaa6238ad5ff00"

#: one query at a time: prints the round-trip seconds of each, as JSON
LATENCY = r"""
import json, socket, sys, time
import dns.message
server, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(1)
out = []
for i in range(n):
    q = dns.message.make_query(name, "A")
    wire = q.to_wire()
    t = time.perf_counter()
    s.send(wire)
    while True:
        r = s.recv(4096)
        if r[:2] == wire[:2]:
            break
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""

#: reads "NAME" lines; asks SERVER once for NAME A (1 s timeout); prints "ADDRESS SECONDS"
#: ("- SECONDS" when there was no address in the answer, "timeout 1" on no answer, "refused
#: SECONDS" when the port was closed)
ASKER = r"""
import socket, sys, time
import dns.message, dns.rdatatype
server = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(1)
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    wire = dns.message.make_query(line.strip(), "A").to_wire()
    s.send(wire)
    try:
        while True:
            r = s.recv(4096)
            if r[:2] == wire[:2]:
                break
    except socket.timeout:
        print("timeout 1", flush=True)
        continue
    except OSError:  # port unreachable: nobody listening at that moment
        print("refused", time.perf_counter() - t, flush=True)
        continue
    m = dns.message.from_wire(r)
    addrs = [str(x) for rr in m.answer for x in rr if rr.rdtype == dns.rdatatype.A]
    print((addrs[0] if addrs else "-"), time.perf_counter() - t, flush=True)
"""


class Asker:
    """The `ASKER` process living in a client namespace."""

    def __init__(self, ns: str, server: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", ASKER, server],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def ask(self, name: str) -> tuple[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        address, seconds = self.proc.stdout.readline().split()
        return address, float(seconds)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- the contenders ---------------------------------------------------------------------------


class NetagentDns:
    name = "netagent"

    def __init__(self, workdir: Path) -> None:
        from agent.frontends.jsonrpc import protocol as p

        self.p = p
        self.agentd = c.Agentd(
            "h-na", "--dns-upstream", "127.0.0.1:9", "--netns-etc-dir", str(workdir / "etc"),
            workdir=workdir,
        )  # fmt: skip
        self.agentd.start()
        self.client = self.agentd.client()
        self.client.call("network.create", p.NetworkCreate(name="n1"))
        self.client.call("network.create", p.NetworkCreate(name="off", options={"dns": "false"}))
        self.server = self.client.call("network.inspect", p.NetworkRef(network="n1"))["network"][
            "gateway"
        ]
        self.client.call("sandbox.run", p.SandboxRun(name="na-web", network="n1", dns_name="web"))
        self.client.call("sandbox.run", p.SandboxRun(name="na-cli", network="n1"))
        self.client_ns = "na-cli"

    def server_pid(self) -> int:
        return self.agentd.pid

    def new_container(self, i: int) -> str:
        ep = self.client.call(
            "sandbox.run", self.p.SandboxRun(name=f"na-f{i}", network="n1", dns_name=f"fresh{i}")
        )
        return str(ep["ip"])

    def close(self) -> None:
        self.agentd.close()


class AardvarkDns:
    """netavark setup with DNS on: netavark writes aardvark's config and starts it."""

    name = "aardvark"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "netavark"
        self.dir.mkdir()
        c.sh("mount", "-t", "tmpfs", "netavark-bench", str(self.dir))
        c.sh("ip", "netns", "add", "h-nv")
        c.sh("ip", "-n", "h-nv", "link", "set", "lo", "up")
        self.server = "10.88.0.1"
        self.info = {
            "name": "pnet1", "id": NV_NET_ID, "driver": "bridge", "network_interface": "podman1",
            "subnets": [{"subnet": "10.88.0.0/16", "gateway": self.server}],
            "ipv6_enabled": False, "internal": False, "dns_enabled": True,
            "ipam_options": {"driver": "host-local"},
        }  # fmt: skip
        self.worker = c.NsWorker("/run/netns/h-nv")
        self.setup("web", 2)
        self.setup("cli", 3)
        self.client_ns = "nv-cli"

    def server_pid(self) -> int:
        return int((self.dir / "aardvark-dns" / "aardvark.pid").read_text().strip())

    def setup(self, name: str, slot: int) -> str:
        ns = f"nv-{name}"
        c.sh("ip", "netns", "add", ns)
        ip = f"10.88.{slot // 250}.{2 + slot % 250}"
        opts = {
            "container_id": f"{slot:064x}", "container_name": name,
            "networks": {"pnet1": {"interface_name": "eth0", "static_ips": [ip],
                                   "aliases": [name]}},
            "network_info": {"pnet1": self.info},
        }  # fmt: skip
        self.worker.call(self._run, "setup", f"/run/netns/{ns}", json.dumps(opts).encode())
        return ip

    def _run(self, verb: str, path: str, options: bytes) -> None:
        r = subprocess.run(
            [NETAVARK, "--config", str(self.dir), "--aardvark-binary", AARDVARK, verb, path],
            input=options, env=dict(os.environ, NETAVARK_FW="iptables"), capture_output=True,
            timeout=60,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"netavark {verb}: {r.stderr[:400]!r}")

    def new_container(self, i: int) -> str:
        return self.setup(f"fresh{i}", 10 + i)

    def close(self) -> None:
        pid_file = self.dir / "aardvark-dns" / "aardvark.pid"
        if pid_file.exists():  # aardvark runs detached: stop it by its own pid file
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        self.worker.close()
        c.sh("umount", "-l", str(self.dir), check=False)


# -- measurements ----------------------------------------------------------------------------

_DNSPERF = {
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "avg_latency_ms": re.compile(r"Average Latency \(s\):\s+([\d.]+)"),
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(ns: str, server: str, datafile: Path, seconds: float, pid: int) -> dict[str, float]:
    """One dnsperf run; with the server's CPU time per answered query (`pid`'s)."""
    cpu0 = cpu_seconds(pid)
    out = c.sh(
        "ip", "netns", "exec", ns, "dnsperf", "-s", server, "-d", str(datafile),
        "-l", str(seconds), "-c", "8", "-T", "1", "-q", "64", timeout=seconds + 60,
    )  # fmt: skip
    cpu = cpu_seconds(pid) - cpu0
    found = {k: float(m.group(1)) for k, rx in _DNSPERF.items() if (m := rx.search(out))}
    found["server_cpu_us_per_query"] = round(cpu / max(found.get("completed", 0), 1) * 1e6, 2)
    found["avg_latency_ms"] = round(found.get("avg_latency_ms", float("nan")) * 1000, 3)
    found["qps"] = round(found.get("qps", 0.0), 1)
    return found


def latency(ns: str, server: str, n: int) -> list[float]:
    out = c.sh("ip", "netns", "exec", ns, sys.executable, "-c", LATENCY, server, "web", str(n))
    return list(json.loads(out))


def first_queries(peer: Any, n: int) -> dict[str, Any]:
    asker = Asker(peer.client_ns, peer.server)
    answered, waits = 0, []
    missed: dict[str, int] = {}
    try:
        for i in range(n):
            ip = peer.new_container(i)
            address, seconds = asker.ask(f"fresh{i}")
            if address == ip:
                answered += 1
                waits.append(seconds)
            else:  # "refused", "timeout", "-" (no address), or another address
                outcome = address if address in ("refused", "timeout", "-") else "other"
                missed[outcome] = missed.get(outcome, 0) + 1
    finally:
        asker.close()
    return {
        "tried": n, "first_query_answered": answered, "missed": missed,
        "answer": c.summarize(waits),
    }  # fmt: skip


def library(n: int) -> dict[str, float]:
    """Microseconds per parse + answer + pack, median of 5 runs of `n` calls."""
    import dns.flags
    import dns.message
    import dns.rdataclass
    import dns.rdatatype
    import dns.rdtypes.IN.A
    import dnslib

    query = dns.message.make_query("web.", "A").to_wire()
    rdata = dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, "172.18.0.2")

    def with_dnspython() -> bytes:
        m = dns.message.from_wire(query)
        r = dns.message.make_response(m)
        rrset = r.find_rrset(r.answer, m.question[0].name, 1, 1, create=True)
        rrset.add(rdata, 0)
        r.flags |= dns.flags.AA
        return bytes(r.to_wire())

    def with_dnslib() -> bytes:
        m = dnslib.DNSRecord.parse(query)
        r = m.reply()
        r.add_answer(dnslib.RR(m.q.qname, 1, rdata=dnslib.A("172.18.0.2"), ttl=0))
        return bytes(r.pack())

    result = {}
    for label, fn in (("dnslib_us", with_dnslib), ("dnspython_us", with_dnspython)):
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t) / n * 1e6)
        result[label] = round(sorted(runs)[2], 1)
    return result


def dns_cost(na: NetagentDns, trials: int, churn_s: float, rounds: int) -> dict[str, Any]:
    """Attach p50 and churn on the DNS-on network vs the DNS-off one (alternated)."""
    from bench_attach import NetagentApi
    from bench_churn import Loop, churn

    class WithAlias(NetagentApi):
        def attach(self, cid: str, netns_path: str, slot: int = 0) -> None:
            params = c.connect_params(self.network, netns_path)
            params.aliases = [cid]
            self.client.call("endpoint.connect", params)

    c.add_netns([*(f"cost{i}" for i in range(2 * trials)), *(f"ch{i}" for i in range(16))])
    apis = {net: WithAlias(na.agentd, net) for net in ("n1", "off")}
    attach: dict[str, list[float]] = {"n1": [], "off": []}
    detach: dict[str, list[float]] = {"n1": [], "off": []}
    for verb, samples in (("attach", attach), ("detach", detach)):
        for i in range(trials):  # a fresh namespace each time: no wait for a dying eth0
            for k, net in enumerate(("n1", "off")):
                call = getattr(apis[net], verb)
                t = time.perf_counter()
                call(f"cost{2 * i + k}", f"/run/netns/cost{2 * i + k}")
                samples[net].append(time.perf_counter() - t)
    cycles: dict[str, list[float]] = {"n1": [], "off": []}
    for _ in range(rounds):
        for net in ("n1", "off"):
            loops = [Loop(i, WithAlias(na.agentd, net), f"ch{i}", None) for i in range(16)]
            cycles[net].append(churn(loops, churn_s)["cycles_per_s"])
    on, off = c.summarize(attach["n1"]), c.summarize(attach["off"])
    return {
        "attach_dns_on": on,
        "attach_dns_off": off,
        "attach_p50_on_over_off": c.ratio(on["p50"], off["p50"]),
        "detach_dns_on": c.summarize(detach["n1"]),
        "detach_dns_off": c.summarize(detach["off"]),
        "churn_cycles_per_s_on": cycles["n1"],
        "churn_cycles_per_s_off": cycles["off"],
        "churn_on_over_off": c.ratio(sum(cycles["n1"]), sum(cycles["off"])),
    }


def main() -> None:
    ap = c.base_parser("dns", __doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="dnsperf seconds per run")
    ap.add_argument("--rounds", type=int, default=3, help="alternated runs per contender")
    ap.add_argument("--queries", type=int, default=3000, help="sequential queries for latency")
    ap.add_argument("--fresh", type=int, default=20, help="new containers asked at once")
    ap.add_argument(
        "--server-only", action="store_true",
        help="only the server figures (1-3): no DNS-cost or wire-library measurement",
    )  # fmt: skip
    args = ap.parse_args()
    c.isolate()
    if args.quick:
        args.seconds, args.rounds, args.queries, args.fresh = 1.0, 1, 300, 5
    workdir = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    datafile = workdir / "queries"
    datafile.write_text("web A\n")
    peers: list[Any] = []
    results: dict[str, Any] = {}
    try:
        peers = [NetagentDns(workdir), AardvarkDns(workdir)]
        for peer in peers:  # both answer before anything is measured
            assert latency(peer.client_ns, peer.server, 1), peer.name
        runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in peers}
        lat: dict[str, list[float]] = {p.name: [] for p in peers}
        for _ in range(args.rounds):
            for peer in peers:
                runs[peer.name].append(
                    dnsperf(peer.client_ns, peer.server, datafile, args.seconds, peer.server_pid())
                )
                lat[peer.name] += latency(peer.client_ns, peer.server, args.queries // args.rounds)
        for peer in peers:
            qps = sorted(r["qps"] for r in runs[peer.name])
            cpu = sorted(r["server_cpu_us_per_query"] for r in runs[peer.name])
            results[peer.name] = {
                "dnsperf_runs": runs[peer.name],
                "qps_median": qps[len(qps) // 2],
                "server_cpu_us_per_query_median": cpu[len(cpu) // 2],
                "sequential_latency": c.summarize(lat[peer.name]),
                "first_queries": first_queries(peer, args.fresh),
            }
        na, av = results["netagent"], results["aardvark"]
        results["qps_ratio_netagent_over_aardvark"] = c.ratio(na["qps_median"], av["qps_median"])
        results["cpu_per_query_ratio_netagent_over_aardvark"] = c.ratio(
            na["server_cpu_us_per_query_median"], av["server_cpu_us_per_query_median"]
        )
        results["p99_ratio_netagent_over_aardvark"] = c.ratio(
            na["sequential_latency"]["p99"], av["sequential_latency"]["p99"]
        )
        if not args.server_only:
            results["dns_cost"] = dns_cost(
                peers[0], 20 if args.quick else 200, 2.0 if args.quick else 5.0, args.rounds
            )
            results["library"] = library(2000 if args.quick else 20000)
    finally:
        for peer in peers:
            peer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for name in ("netagent", "aardvark"):
        r = results[name]
        rows.append([
            name, r["qps_median"], r["server_cpu_us_per_query_median"],
            r["sequential_latency"]["p50"], r["sequential_latency"]["p99"],
            f"{r['first_queries']['first_query_answered']}/{r['first_queries']['tried']}",
            r["first_queries"]["answer"].get("p50"),
        ])  # fmt: skip
    headers = ["peer", "qps", "cpu us/query", "p50 ms", "p99 ms", "1st query ok", "1st answer ms"]
    print(c.table(headers, rows))
    print(f"qps ratio {results['qps_ratio_netagent_over_aardvark']}, "
          f"cpu/query ratio {results['cpu_per_query_ratio_netagent_over_aardvark']}, "
          f"p99 ratio {results['p99_ratio_netagent_over_aardvark']}")  # fmt: skip
    if not args.server_only:
        print("dns cost:", json.dumps(results["dns_cost"]))
        print("library:", results["library"])
    c.write_json(args.json, "dns", args, results)


if __name__ == "__main__":
    main()
