"""Shared plumbing of the comparative benchmarks: isolation, namespaces, agentd, stats, output.

Safety: every bench calls `isolate()` first. Outside a private namespace it re-execs the script
under `unshare --net --mount --propagation private` with a tmpfs on /run/netns and /etc/netns
and `lo` up, so every interface, namespace, rule and packet it makes lives in namespaces
created for the run and vanishes with it. `ISOLATED_ENV` marks the re-exec'd process.

Timing: `time.perf_counter` around the whole operation as a caller sees it (a socket round trip,
a plugin's fork+exec+exit). Percentiles interpolate linearly between order statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.frontends.jsonrpc.client import Client  # noqa: E402

ISOLATED_ENV = "NETAGENT_BENCH_ISOLATED"
VENV_BIN = ROOT / ".venv" / "bin"
RESULTS_DIR = ROOT / "bench" / "results"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

_SETUP = (
    "mkdir -p /run/netns /etc/netns && mount -t tmpfs netagent-bench /run/netns "
    "&& mount -t tmpfs netagent-bench /etc/netns "
    '&& ip link set lo up && exec "$@"'
)


def isolate() -> None:
    """Re-exec this script in a private net+mount namespace unless already there."""
    if os.environ.get(ISOLATED_ENV) == "1":
        return
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (it creates namespaces inside a private one)")
    env = dict(os.environ, **{ISOLATED_ENV: "1"})
    argv = [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    cmd = [
        "unshare",
        "--net",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        _SETUP,
        "sh",
        *argv,
    ]
    sys.stdout.flush()
    os.execvpe("unshare", cmd, env)


def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options every bench shares: --json PATH and --quick."""
    ap = argparse.ArgumentParser(prog=f"bench_{name}.py", description=(doc or "").split("\n")[0])
    ap.add_argument(
        "--json",
        default=str(RESULTS_DIR / f"{name}.json"),
        metavar="PATH",
        help="where to write the machine-readable results (default: %(default)s)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny run (< 20 s), for smoke tests")
    return ap


# -- shell helpers --------------------------------------------------------------------------
def sh(*cmd: str, check: bool = True, timeout: float = 120, **kw: Any) -> str:
    """Run a command, return its stdout; raise with its stderr on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def ip_batch(lines: Iterable[str], timeout: float = 600) -> None:
    """Feed `ip -b -` many commands at once (one process, no fork per command)."""
    text = "".join(f"{line}\n" for line in lines)
    if text:
        r = subprocess.run(
            ["ip", "-b", "-"], input=text, capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0:
            raise RuntimeError(f"ip -b failed: {r.stderr.strip()[:500]}")


def add_netns(names: Sequence[str]) -> float:
    """Create named namespaces like `ip netns add` (lo left down); returns the seconds taken."""
    t0 = time.perf_counter()
    ip_batch(f"netns add {n}" for n in names)
    return time.perf_counter() - t0


def setns(path: str) -> None:
    """Move the calling THREAD into the network namespace at `path` (children inherit it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NsWorker:
    """A thread living in one network namespace that runs submitted calls in order.

    Processes it spawns (CNI plugins, netavark) start in that namespace, like a runtime's.
    """

    def __init__(self, netns_path: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(netns_path, ready), daemon=True)
        self._thread.start()
        problem = ready.get()
        if problem is not None:
            raise problem

    def _loop(self, path: str, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            setns(path)
        except BaseException as exc:  # reported to the constructor
            ready.put(exc)
            return
        ready.put(None)
        while (job := self._jobs.get()) is not None:
            fn, args, box = job
            try:
                box.put((True, fn(*args)))
            except BaseException as exc:
                box.put((False, exc))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        box: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._jobs.put((fn, args, box))
        ok, value = box.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(10)


# -- agentd ---------------------------------------------------------------------------------
class Agentd:
    """agentd running in its own host namespace (`ip netns add`), like tests/e2e/harness."""

    def __init__(self, name: str, *extra_args: str, workdir: Path | None = None) -> None:
        self.host = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=workdir))
        self.socket = str(self.dir / "agent.sock")
        self.state_dir = str(self.dir / "state")
        self.log_path = self.dir / "agentd.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.host}"

    def start(self, timeout: float = 120.0) -> float:
        """Start agentd; return seconds from spawn until `system.info` answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net={self.netns_path}",
                str(VENV_BIN / "agentd"),
                "--socket",
                self.socket,
                "--state-dir",
                self.state_dir,
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        return self.wait_ready(t0, timeout)

    def wait_ready(self, t0: float, timeout: float) -> float:
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited {self.proc.returncode}:\n{self.log()[-2000:]}")
            if os.path.exists(self.socket):
                with contextlib.suppress(Exception):
                    Client(self.socket, timeout=5).call("system.info")
                    return time.perf_counter() - t0
            time.sleep(0.002)
        raise RuntimeError(f"agentd not ready in {timeout}s:\n{self.log()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Signal agentd and wait for it to exit; returns seconds it took."""
        if self.proc is None:
            return 0.0
        t0 = time.perf_counter()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self.proc = None
        return time.perf_counter() - t0

    @property
    def pid(self) -> int:
        """The agentd process (nsenter execs it, so the child's pid is agentd's)."""
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        """agentd's RSS plus its kernel worker's (its children, as the Trio thread spawned)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return rss_mb(self.pid) + sum(rss_mb(int(child)) for child in children)

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(signal.SIGKILL, timeout=10)
        sh("ip", "netns", "del", self.host, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect_params(network: str, netns: str) -> Any:
    from agent.frontends.jsonrpc import protocol as p

    return p.EndpointConnect(network=network, netns=netns)


def disconnect_params(network: str, netns: str) -> Any:
    from agent.frontends.jsonrpc import protocol as p

    return p.EndpointDisconnect(network=network, netns=netns)


# -- statistics and output ------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, mean, min, max of durations given in seconds, reported in ms."""
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(statistics.fmean(ms), 3),
        "min": round(ms[0], 3),
        "max": round(ms[-1], 3),
    }


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table; floats get 2 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.2f}"
        return "-" if v is None else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the figures depend on: machine, kernel, tool versions."""

    def version(*cmd: str) -> str:
        with contextlib.suppress(Exception):
            return sh(*cmd, check=False, timeout=10).strip().splitlines()[0]
        return "?"

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": version("iptables", "--version"),
        "netavark": version("/usr/lib/podman/netavark", "--version"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str, bench: str, args: argparse.Namespace, results: Any) -> None:
    """Write {bench, args, environment, results} to `path` (parents created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": bench, "args": vars(args), "environment": environment(), "results": results}
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"\nresults written to {out}")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if not a or not b:
        return None
    return round(a / b, 2)
