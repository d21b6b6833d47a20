"""Attach/detach latency of one endpoint to an existing namespace: netagent against its peers.

Usage: .venv/bin/python bench/bench_attach.py [--trials 200] [--quick] [--json PATH]

Contenders, side by side in one run, each with its own host namespace (agentd, the plugins and
the floor never share a bridge or a ruleset):
- `netagent`: `endpoint.connect` / `endpoint.disconnect` over one persistent Client connection
  to agentd running in its host namespace; `netagent-nft` the same with `agentd --firewall
  nftables` (issue 13: no slower than iptables);
- `cni-bridge`: /usr/lib/cni/bridge + host-local (CNI 1.0.0, isGateway, ipMasq), ADD / DEL,
  one fork+exec each, like a runtime calls it;
- `netavark`: /usr/lib/podman/netavark setup / teardown (iptables driver, static IP, no DNS);
- `floor`: a minimal fork-free pyroute2 script doing only the kernel work (veth born with its
  peer in the namespace, one queue per end, enslaved and up; then, through a socket opened
  inside by a thread that setns()'d: peer up, address, lo up, default route; detach = delete
  the veth).

Every namespace is made beforehand (`ip netns add`, untimed), one fresh namespace per trial and
contender. Each network keeps one "keeper" endpoint attached, so the measured trial never
creates or deletes the bridge (netavark would delete it with its last endpoint). Trials are
interleaved (trial i of every contender, then trial i+1) so machine noise hits all alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c

CNI_DIR = "/usr/lib/cni"
NETAVARK = "/usr/lib/podman/netavark"
NETAVARK_NET_ID = "af67fbba1b0f33574c46f7e003f95330782817c3727f9157e30b70c2010ac36a"


class CniBridge:
    """The CNI bridge plugin with host-local IPAM, run the way a runtime runs it."""

    name = "cni-bridge"

    def __init__(self, host_path: str, workdir: Path, subnet: str = "10.89.0.0/16") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cni-", dir=workdir))
        gateway = subnet.rsplit(".", 2)[0] + ".0.1"
        conf = {
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": "bridge",
            "bridge": "cni-bench0",
            "isGateway": True,
            "ipMasq": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(self.dir / "ipam"),
                "routes": [{"dst": "0.0.0.0/0"}],
                "ranges": [[{"subnet": subnet, "gateway": gateway}]],
            },
        }
        self.conf = json.dumps(conf).encode()
        self.host_path = host_path

    def _run(self, command: str, cid: str, netns_path: str) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": CNI_DIR,
        }
        r = subprocess.run(
            [f"{CNI_DIR}/bridge"], input=self.conf, env=env, capture_output=True, timeout=60
        )
        if r.returncode != 0:
            raise RuntimeError(f"cni {command} {cid}: {r.stdout[:300]!r} {r.stderr[:300]!r}")

    def attach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self._run("ADD", cid, netns_path)

    def detach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self._run("DEL", cid, netns_path)


class Netavark:
    """netavark setup/teardown with a static address per slot (podman does IPAM itself)."""

    name = "netavark"

    def __init__(self, host_path: str, workdir: Path, prefix: str = "10.88") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="netavark-", dir=workdir))
        self.prefix = prefix
        self.info = {
            "name": "pnet1",
            "id": NETAVARK_NET_ID,
            "driver": "bridge",
            "network_interface": "podman1",
            "subnets": [{"subnet": f"{prefix}.0.0/16", "gateway": f"{prefix}.0.1"}],
            "ipv6_enabled": False,
            "internal": False,
            "dns_enabled": False,
            "ipam_options": {"driver": "host-local"},
        }
        self.host_path = host_path

    def options(self, cid: str, slot: int) -> bytes:
        ip = f"{self.prefix}.{1 + slot // 250}.{2 + slot % 250}"
        return json.dumps(
            {
                "container_id": cid,
                "container_name": cid,
                "networks": {"pnet1": {"interface_name": "eth0", "static_ips": [ip]}},
                "network_info": {"pnet1": self.info},
            }
        ).encode()

    def _run(self, verb: str, cid: str, netns_path: str, slot: int) -> None:
        env = dict(os.environ, NETAVARK_FW="iptables")
        r = subprocess.run(
            [NETAVARK, "--config", str(self.dir), verb, netns_path],
            input=self.options(cid, slot),
            env=env,
            capture_output=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"netavark {verb} {cid}: {r.stderr[:400]!r}")

    def attach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self._run("setup", cid, netns_path, slot)

    def detach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self._run("teardown", cid, netns_path, slot)


class NetagentApi:
    """agentd's socket API over one persistent connection."""

    name = "netagent"

    def __init__(self, agentd: c.Agentd, network: str = "bench") -> None:
        self.client = agentd.client()
        self.network = network

    def attach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self.client.call("endpoint.connect", c.connect_params(self.network, netns_path))

    def detach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self.client.call("endpoint.disconnect", c.disconnect_params(self.network, netns_path))


class Floor:
    """Only the kernel work, through pyroute2, fork-free. Lives in its host's NsWorker."""

    name = "floor"

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.ipr.link("add", ifname="br-floor", kind="bridge")
        (self.bridge,) = self.ipr.link_lookup(ifname="br-floor")
        self.ipr.addr("add", index=self.bridge, address="10.90.0.1", prefixlen=16)
        self.ipr.link("set", index=self.bridge, state="up")

    @staticmethod
    def _inside(netns_path: str) -> None:
        from pyroute2 import IPRoute

        c.setns(netns_path)  # this throwaway thread only
        ipr = IPRoute()
        try:
            (index,) = ipr.link_lookup(ifname="eth0")
            ipr.link("set", index=index, state="up")
            ipr.addr("add", index=index, address="10.90.0.2", prefixlen=16)
            ipr.link("set", index=1, state="up")
            ipr.route("add", dst="default", gateway="10.90.0.1")
        finally:
            ipr.close()

    def attach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.ipr.link(
                "add",
                ifname=f"vf{cid[-10:]}",
                kind="veth",
                master=self.bridge,
                state="up",
                # one queue per end from birth, as netagent does (else two RCU waits, see rtnl)
                num_tx_queues=1,
                num_rx_queues=1,
                peer={"ifname": "eth0", "net_ns_fd": fd, "num_tx_queues": 1, "num_rx_queues": 1},
            )
        finally:
            os.close(fd)
        problem: list[BaseException] = []

        def run() -> None:
            try:
                self._inside(netns_path)
            except BaseException as exc:
                problem.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join()
        if problem:
            raise problem[0]

    def detach(self, cid: str, netns_path: str, slot: int = 0) -> None:
        self.ipr.link("del", ifname=f"vf{cid[-10:]}")


class Contender:
    """A peer with its host namespace, container namespaces and samples."""

    def __init__(self, name: str, impl: Any, worker: c.NsWorker | None) -> None:
        self.name, self.impl, self.worker = name, impl, worker
        self.attach_s: list[float] = []
        self.detach_s: list[float] = []

    def _timed(self, fn: Any, *args: Any) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    def run(self, fn: Any, *args: Any) -> float:
        if self.worker is None:
            return self._timed(fn, *args)
        return self.worker.call(self._timed, fn, *args)

    def trial(self, cid: str, netns_path: str, record: bool) -> None:
        ta = self.run(self.impl.attach, cid, netns_path)
        td = self.run(self.impl.detach, cid, netns_path)
        if record:
            self.attach_s.append(ta)
            self.detach_s.append(td)


def build(names: list[str], workdir: Path, keep: list[Any]) -> tuple[list[Contender], dict]:
    """Set up every contender that can run here; returns them and the reasons for the others."""
    out: list[Contender] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            if name in ("netagent", "netagent-nft"):  # -nft: `agentd --firewall nftables`
                fw = ("--firewall", "nftables") if name == "netagent-nft" else ()
                agentd = c.Agentd(f"h-{name}", "--pool", "10.200.0.0/16:24", *fw, workdir=workdir)
                keep.append(agentd)
                agentd.start()
                from agent.frontends.jsonrpc import protocol as p

                agentd.client().call("network.create", p.NetworkCreate(name="bench"))
                out.append(Contender(name, NetagentApi(agentd), None))
                continue
            host = f"h-{name}"
            c.sh("ip", "netns", "add", host)
            c.sh("ip", "-n", host, "link", "set", "lo", "up")
            worker = c.NsWorker(f"/run/netns/{host}")
            keep.append(worker)
            if name == "cni-bridge":
                impl: Any = CniBridge(f"/run/netns/{host}", workdir)
            elif name == "netavark":
                impl = Netavark(f"/run/netns/{host}", workdir)
            else:
                impl = worker.call(Floor)
            out.append(Contender(name, impl, worker))
        except Exception as exc:  # a peer missing here is reported, not fatal
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return out, skipped


def keeper(con: Contender) -> None:
    """Attach one endpoint that stays (so the bridge stays) and check it really works."""
    ns = f"k-{con.name}"
    c.sh("ip", "netns", "add", ns)
    con.run(con.impl.attach, f"keeper{con.name}", f"/run/netns/{ns}", 249)
    addrs = json.loads(c.sh("ip", "-n", ns, "-j", "addr", "show", "dev", "eth0"))
    if not any(a["family"] == "inet" for a in addrs[0]["addr_info"]):
        raise RuntimeError(f"{con.name}: keeper eth0 has no IPv4 address")


def report(contenders: list[Contender]) -> dict[str, Any]:
    """Print the table and ratios; return the JSON results."""
    results: dict[str, Any] = {}
    for con in contenders:
        results[con.name] = {
            "attach": c.summarize(con.attach_s),
            "detach": c.summarize(con.detach_s),
        }
    base = results.get("netagent")
    rows = []
    for name, r in results.items():
        a, d = r["attach"], r["detach"]
        ra = c.ratio(a.get("p50"), base["attach"].get("p50")) if base else None
        rd = c.ratio(d.get("p50"), base["detach"].get("p50")) if base else None
        r["ratio_vs_netagent"] = {"attach_p50": ra, "detach_p50": rd}
        rows.append(
            [
                name,
                a["p50"],
                a["p90"],
                a["p99"],
                a["mean"],
                d["p50"],
                d["p90"],
                d["p99"],
                d["mean"],
                ra,
                rd,
            ]
        )
    print(
        c.table(
            [
                "contender (ms)",
                "att p50",
                "att p90",
                "att p99",
                "att mean",
                "det p50",
                "det p90",
                "det p99",
                "det mean",
                "att x",
                "det x",
            ],
            rows,
        )
    )
    print("x = contender p50 / netagent p50 (above 1: netagent is faster)")
    return results


def main() -> None:
    c.isolate()
    ap = c.base_parser("attach", __doc__)
    ap.add_argument("--trials", type=int, default=200, help="measured trials per contender")
    ap.add_argument("--warmup", type=int, default=5, help="unrecorded trials first")
    ap.add_argument(
        "--only",
        default="netagent,netagent-nft,cni-bridge,netavark,floor",
        help="comma-separated contenders (default: %(default)s)",
    )
    args = ap.parse_args()
    if args.quick:
        args.trials, args.warmup = min(args.trials, 20), 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-attach-"))
    keep: list[Any] = []
    try:
        contenders, skipped = build(args.only.split(","), workdir, keep)
        for con in list(contenders):
            try:
                keeper(con)
            except Exception as exc:
                skipped[con.name] = f"keeper: {type(exc).__name__}: {exc}"
                contenders.remove(con)
        total = args.warmup + args.trials
        names = {con.name: [f"c{k}n{i}" for i in range(total)] for k, con in enumerate(contenders)}
        setup_s = c.add_netns([n for ns in names.values() for n in ns])
        print(
            f"{len(contenders)} contenders, {args.trials} trials (+{args.warmup} warm-up), "
            f"{sum(map(len, names.values()))} namespaces made in {setup_s:.1f} s"
        )
        for i in range(total):
            for con in contenders:
                con.trial(f"bench{i:08d}", f"/run/netns/{names[con.name][i]}", i >= args.warmup)
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        results = report(contenders)
        results["skipped"] = skipped
        c.write_json(args.json, "attach", args, results)
    finally:
        for item in reversed(keep):
            item.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
