"""CNI plugins at the process level, as a runtime calls them: netagent against its peers.

Usage: .venv/bin/python bench/bench_cni.py [--trials 100] [--churn-rounds 6]
       [--churn-passes 2] [--podman 8] [--quick] [--json PATH]

Contenders, side by side in one run, each with its own host namespace:
- `netagent-c`: the `netagent` plugin executable (the C client built at install) talking to
  agentd in its host namespace; one fork+exec per ADD / DEL;
- `netagent-py`: the same with the pure-Python client (`agentctl cni install` without a
  compiler writes it);
- `cni-bridge`: /usr/lib/cni/bridge + host-local (CNI 1.0.0, isGateway, ipMasq);
- `netavark`: /usr/lib/podman/netavark setup / teardown (iptables driver, static IP): not a CNI
  plugin, but what podman runs instead of one, called the same way (one process per call).

1. Latency: ADD then DEL of one fresh namespace per trial, trials interleaved across
   contenders; each network keeps a "keeper" endpoint, so no trial creates or deletes a bridge.
2. Churn (`--churn-passes` alternated passes, the machine's load drifting between them):
   64 concurrent loops, each ADD+DEL on its own namespace `--churn-rounds` times:
   ADD+DEL pairs per second, netagent-c against cni-bridge and netavark; and the same
   requests without processes (`cni.exec` over one connection per loop, `netagent-socket`),
   what the plugin processes cost.
3. `podman run --rm IMAGE true` with the CNI backend (hermetic podman, busybox image imported)
   on a netagent network against the same on a `bridge`+`host-local` conflist: the whole
   command, as a user pays it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import _common as c
from bench_attach import CNI_DIR, NETAVARK, CniBridge, Netavark

from agent.frontends.cli import cni as cni_install
from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.client import Client

CHURN_LOOPS = 64


class Spawner:
    """Runs a plugin the cheap way a Go runtime does (vfork+exec, stdin from a file, no pipes
    to pump): `subprocess.run` costs the driver several ms of Python per call, which under
    64 concurrent loops made the benchmark measure itself. Stdin files are written once per
    distinct content, before any timing."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "stdin"
        self.dir.mkdir(exist_ok=True)
        self.files: dict[bytes, str] = {}
        self.lock = threading.Lock()

    def prepare(self, data: bytes) -> str:
        with self.lock:
            if data not in self.files:
                path = str(self.dir / f"{len(self.files)}.json")
                Path(path).write_bytes(data)
                self.files[data] = path
            return self.files[data]

    def run(self, argv: list[str], env: dict[str, str], stdin_path: str) -> None:
        actions = [(os.POSIX_SPAWN_OPEN, 0, stdin_path, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]  # fmt: skip
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            with open(stdin_path, "rb") as f:
                r = subprocess.run(argv, stdin=f, env=env, capture_output=True, timeout=60)
            raise RuntimeError(f"{argv[0]} {env.get('CNI_COMMAND')}: {r.stdout[:300]!r} "
                               f"{r.stderr[:300]!r}")  # fmt: skip


def cni_env(command: str, cid: str, netns_path: str, path: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path,
            "CNI_IFNAME": "eth0", "CNI_PATH": path}  # fmt: skip


class Plugin:
    """A contender as processes: (argv, env, stdin) for each call, run by a `Spawner`."""

    def __init__(self, spawner: Spawner, calls: Any) -> None:
        self.spawner = spawner
        self.calls = calls  # (verb, cid, netns_path, slot) -> (argv, env, stdin bytes)

    def prepare(self, verb: str, cid: str, netns_path: str, slot: int) -> Any:
        argv, env, data = self.calls(verb, cid, netns_path, slot)
        return argv, env, self.spawner.prepare(data)

    def call(self, prepared: Any) -> None:
        self.spawner.run(*prepared)


def netagent_calls(plugin: str, socket: str, network: str) -> Any:
    conf = json.dumps({"cniVersion": "1.0.0", "name": network, "type": "netagent",
                       "network": network, "socket": socket}).encode()  # fmt: skip

    def calls(verb: str, cid: str, netns_path: str, slot: int) -> Any:
        return [plugin], cni_env(verb, cid, netns_path, "/unused"), conf

    return calls


def bridge_calls(peer: CniBridge) -> Any:
    def calls(verb: str, cid: str, netns_path: str, slot: int) -> Any:
        return [f"{CNI_DIR}/bridge"], cni_env(verb, cid, netns_path, CNI_DIR), peer.conf

    return calls


def netavark_calls(peer: Netavark) -> Any:
    verbs = {"ADD": "setup", "DEL": "teardown"}

    def calls(verb: str, cid: str, netns_path: str, slot: int) -> Any:
        argv = [NETAVARK, "--config", str(peer.dir), verbs[verb], netns_path]
        return argv, dict(os.environ, NETAVARK_FW="iptables"), peer.options(cid, slot)

    return calls


class SocketApi:
    """The same requests without a process: `cni.exec` over one connection per loop (the
    reference for what the plugin processes cost; churn only)."""

    def __init__(self, socket: str, network: str) -> None:
        self.socket = socket
        conf = {"cniVersion": "1.0.0", "name": network, "type": "netagent", "network": network}
        self.stdin = base64.b64encode(json.dumps(conf).encode()).decode()
        self.local = threading.local()

    def prepare(self, verb: str, cid: str, netns_path: str, slot: int) -> Any:
        env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path,
               "CNI_IFNAME": "eth0"}  # fmt: skip
        return {"env": env, "stdin": self.stdin}

    def call(self, prepared: Any) -> None:
        if not hasattr(self.local, "client"):
            self.local.client = Client(self.socket, timeout=120)
        out = self.local.client.call("cni.exec", prepared)
        if out["exit"] != 0:
            raise RuntimeError(f"cni.exec: {out}")


def cpu_s(agentd: c.Agentd) -> float:
    """CPU seconds (user + system) of agentd and its kernel worker (its children) so far."""
    pids = [agentd.pid]
    pids += [
        int(x) for x in Path(f"/proc/{agentd.pid}/task/{agentd.pid}/children").read_text().split()
    ]
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


class Contender:
    def __init__(
        self, name: str, impl: Plugin | SocketApi, host: str, agentd: c.Agentd | None = None
    ) -> None:
        self.name, self.impl, self.host, self.agentd = name, impl, host, agentd
        self.worker = c.NsWorker(f"/run/netns/{host}")
        self.add_s: list[float] = []
        self.del_s: list[float] = []
        self.churn: dict[str, float] = {}

    def timed(self, verb: str, cid: str, netns_path: str, slot: int) -> float:
        prepared = self.impl.prepare(verb, cid, netns_path, slot)

        def run() -> float:
            t0 = time.perf_counter()
            self.impl.call(prepared)
            return time.perf_counter() - t0

        return float(self.worker.call(run))

    def close(self) -> None:
        self.worker.close()


def build(workdir: Path, keep: list[Any]) -> list[Contender]:
    agentd = c.Agentd("h-netagent", workdir=workdir)
    keep.append(agentd)
    agentd.start()
    agentd.client().call("network.create", p.NetworkCreate(name="cbench", subnet="10.77.0.0/16"))
    py = cni_install.install(str(workdir / "py"), str(workdir / "py"), "cbench", agentd.socket,
                             native=None)["plugin"]  # fmt: skip
    spawner = Spawner(workdir)
    out = [
        Contender("netagent-c", Plugin(spawner, netagent_calls(cni_install.NATIVE,
                                                               agentd.socket, "cbench")),
                  agentd.host, agentd),
        Contender("netagent-py", Plugin(spawner, netagent_calls(py, agentd.socket, "cbench")),
                  agentd.host, agentd),
    ]  # fmt: skip
    for name in ("cni-bridge", "netavark"):
        host = f"h-{name}"
        c.sh("ip", "netns", "add", host)
        c.sh("ip", "-n", host, "link", "set", "lo", "up")
        if name == "cni-bridge":
            calls = bridge_calls(CniBridge(f"/run/netns/{host}", workdir))
        else:
            calls = netavark_calls(Netavark(f"/run/netns/{host}", workdir))
        out.append(Contender(name, Plugin(spawner, calls), host))
    keep.extend(out)
    for k, con in enumerate(out):  # a keeper endpoint: no trial makes or deletes a bridge
        ns = f"keep{k}"
        c.sh("ip", "netns", "add", ns)
        con.timed("ADD", f"keeper{k}", f"/run/netns/{ns}", 1000)
    return out


def latency(contenders: list[Contender], trials: int, warmup: int) -> None:
    total = trials + warmup
    names = {con.name: [f"l{k}n{i}" for i in range(total)] for k, con in enumerate(contenders)}
    c.add_netns([n for ns in names.values() for n in ns])
    for i in range(total):
        for con in contenders:
            ns = f"/run/netns/{names[con.name][i]}"
            ta = con.timed("ADD", f"lat{i:06d}", ns, i)
            td = con.timed("DEL", f"lat{i:06d}", ns, i)
            if i >= warmup:
                con.add_s.append(ta)
                con.del_s.append(td)


def churn(con: Contender, rounds: int, tag: str) -> None:
    """CHURN_LOOPS processes, each in the contender's host namespace, each ADD+DEL `rounds`
    times on its own namespace; pairs per second over the whole wall time.

    Processes, not threads: `os.posix_spawn` holds the GIL until the child has exec'd, so
    64 threads of one Python process spawn one plugin at a time, and under load that, not
    the plugin, set the pace (~80 pairs/s for every fast contender). A runtime forks from
    many threads at once."""
    spaces = [f"ch{tag}{i}" for i in range(CHURN_LOOPS)]
    c.add_netns(spaces)
    plans = []
    for i in range(CHURN_LOOPS):  # stdin files written here, before any fork
        cid, ns = f"churn{tag}{i}", f"/run/netns/{spaces[i]}"
        plans.append((con.impl.prepare("ADD", cid, ns, 2000 + i),
                      con.impl.prepare("DEL", cid, ns, 2000 + i)))  # fmt: skip
    go_r, go_w = os.pipe()
    pids = []
    for add, delete in plans:
        pid = os.fork()
        if pid == 0:  # the child: one loop, then exit with its status
            status = 1
            try:
                os.close(go_w)
                c.setns(f"/run/netns/{con.host}")
                os.read(go_r, 1)  # the start
                for _ in range(rounds):
                    con.impl.call(add)
                    con.impl.call(delete)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(go_r)
    cpu0 = cpu_s(con.agentd) if con.agentd is not None else None
    t0 = time.perf_counter()
    os.write(go_w, b"x" * CHURN_LOOPS)
    failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
    wall = time.perf_counter() - t0
    os.close(go_w)
    if failed:
        raise RuntimeError(f"{con.name} churn: {failed} loops failed (see stderr)")
    pairs = CHURN_LOOPS * rounds
    con.churn = {"pairs": pairs, "seconds": wall, "pairs_per_s": pairs / wall}
    if con.agentd is not None and cpu0 is not None:  # agentd + worker CPU per pair
        con.churn["agentd_cpu_ms_per_pair"] = (cpu_s(con.agentd) - cpu0) * 1000 / pairs


# -- podman run --rm ---------------------------------------------------------------------------

PODMAN_CONF = """[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "/usr/lib/cni"]
network_config_dir = "{net}"
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
events_logfile_path = "{root}/events.log"
tmp_dir = "{root}/tmp"
[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
"""


def podman(agentd_host: str, agentd_socket: str, workdir: Path, runs: int) -> dict[str, Any]:
    """`podman run --rm` on a netagent network vs a bridge+host-local conflist."""
    if shutil.which("podman") is None:
        return {"skipped": "podman is not installed"}
    root = workdir / "podman"
    for d in ("bin", "net.d", "storage", "run", "tmp", "image/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for path in ("/var/lib/containers", "/run/containers"):
        os.makedirs(path, exist_ok=True)
        c.sh("mount", "-t", "tmpfs", "netagent-bench", path)
    (root / "containers.conf").write_text(
        PODMAN_CONF.format(bin=root / "bin", net=root / "net.d", root=root)
    )
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
    )
    (root / "registries.conf").write_text("")
    env = dict(os.environ, CONTAINERS_CONF=str(root / "containers.conf"),
               CONTAINERS_STORAGE_CONF=str(root / "storage.conf"),
               CONTAINERS_REGISTRIES_CONF=str(root / "registries.conf"))  # fmt: skip
    cmd = ["nsenter", f"--net=/run/netns/{agentd_host}", "podman", "--root",
           str(root / "storage"), "--runroot", str(root / "run")]  # fmt: skip
    shutil.copy("/bin/busybox", root / "image/bin/busybox")
    (root / "image/bin/true").symlink_to("busybox")
    c.sh("tar", "-C", str(root / "image"), "-cf", str(root / "image.tar"), ".")
    subprocess.run([*cmd, "import", str(root / "image.tar"), "localhost/bb"], env=env,
                   check=True, capture_output=True)  # fmt: skip
    cni_install.install(str(root / "bin"), str(root / "net.d"), "cbench", agentd_socket)
    ipam = {
        "type": "host-local",
        "dataDir": str(root / "ipam"),
        "ranges": [[{"subnet": "10.78.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    bridge = {"cniVersion": "1.0.0", "name": "cnibr", "plugins": [
        {"type": "bridge", "bridge": "cni-pm0", "isGateway": True, "ipMasq": True,
         "ipam": ipam}]}  # fmt: skip
    (root / "net.d" / "cnibr.conflist").write_text(json.dumps(bridge))
    times: dict[str, list[float]] = {"netagent": [], "cni-bridge": []}
    for i in range(runs + 1):
        for name, net in (("netagent", "cbench"), ("cni-bridge", "cnibr")):
            t0 = time.perf_counter()
            subprocess.run([*cmd, "run", "--rm", "--network", net, "localhost/bb", "true"],
                           env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
            if i:  # the first run of each warms podman's caches
                times[name].append(time.perf_counter() - t0)
    for path in ("/var/lib/containers", "/run/containers"):
        c.sh("umount", "-l", path, check=False)
    return {name: c.summarize(ts) for name, ts in times.items()}


def main() -> None:
    c.isolate()
    ap = c.base_parser("cni", __doc__)
    ap.add_argument("--trials", type=int, default=100, help="measured ADD/DEL trials")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--churn-rounds", type=int, default=6, help="ADD+DEL per churn loop")
    ap.add_argument("--churn-passes", type=int, default=2, help="alternated churn passes")
    ap.add_argument("--podman", type=int, default=8, help="podman run --rm per network (0: no)")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.warmup, args.churn_rounds, args.churn_passes = 20, 2, 2, 1
        args.podman = min(args.podman, 3)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cni-"))
    keep: list[Any] = []
    try:
        contenders = build(workdir, keep)
        latency(contenders, args.trials, args.warmup)
        base = next(con for con in contenders if con.name == "netagent-c")
        results: dict[str, Any] = {}
        for con in contenders:
            results[con.name] = {"add": c.summarize(con.add_s), "del": c.summarize(con.del_s)}
        rows = [[name, r["add"]["p50"], r["add"]["p99"], r["del"]["p50"], r["del"]["p99"],
                 c.ratio(r["add"]["p50"], results["netagent-c"]["add"]["p50"]),
                 c.ratio(r["del"]["p50"], results["netagent-c"]["del"]["p50"])]
                for name, r in results.items()]  # fmt: skip
        print(f"process-level ADD / DEL, {args.trials} trials each (ms)")
        print(c.table(["contender", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "ADD x", "DEL x"],
                      rows))  # fmt: skip
        print("x = contender p50 / netagent-c p50 (above 1: netagent-c is faster)")
        agentd = keep[0]
        socket_api = Contender("netagent-socket", SocketApi(agentd.socket, "cbench"), agentd.host,
                               agentd)  # fmt: skip
        keep.append(socket_api)
        churners = [con for con in contenders if con.name != "netagent-py"] + [socket_api]
        for n in range(args.churn_passes):  # alternated: the machine's load drifts
            for k, con in enumerate(churners):
                churn(con, args.churn_rounds, f"{n}x{k}")
                results.setdefault(con.name, {}).setdefault("churn", []).append(con.churn)
            print(f"\nchurn pass {n + 1}: {CHURN_LOOPS} concurrent loops x {args.churn_rounds} "
                  "ADD+DEL")  # fmt: skip
            head = ["contender", "pairs/s", "seconds", "netagent-c x", "agentd CPU ms/pair"]
            print(c.table(head, [
                [con.name, con.churn["pairs_per_s"], con.churn["seconds"],
                 c.ratio(base.churn["pairs_per_s"], con.churn["pairs_per_s"]),
                 round(con.churn.get("agentd_cpu_ms_per_pair", float("nan")), 3)]
                for con in churners]))  # fmt: skip
            print("agentd CPU: user + system of agentd and its kernel worker over the pass")
        if args.podman:
            pm = podman(agentd.host, agentd.socket, workdir, args.podman)
            results["podman_run_rm"] = pm
            if "skipped" not in pm:
                print(f"\npodman run --rm (CNI backend), {args.podman} runs each (ms)")
                base_ms = pm["netagent"]["p50"]
                print(c.table(["network", "p50", "p90", "mean", "x"], [
                    [name, s["p50"], s["p90"], s["mean"], c.ratio(s["p50"], base_ms)]
                    for name, s in pm.items()]))  # fmt: skip
        c.write_json(args.json, "cni", args, results)
    finally:
        for item in reversed(keep):
            item.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
