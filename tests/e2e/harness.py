"""Run a real agentd in a fresh network namespace ("the host") and drive it.

Each `Host` is a named namespace made with `ip netns add`; agentd runs in it through
`nsenter --net=...` (same mount namespace, so /run/netns is shared with the tests). Checks use
independent tools: `ip -n HOST -j ...`, `iptables-save` and `nft list` in the host namespace,
real traffic.

The firewall backend is `BACKEND` (`agentd --firewall`), which tests/e2e/conftest.py sets for
each test: every e2e test runs once per backend (a test may name its own `--firewall`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agent.firewall.nftables.script import parse_listing
from agent.frontends.jsonrpc.client import Client

VENV_BIN = Path(sys.executable).parent

#: the firewall backend of the hosts started next (set per test by tests/e2e/conftest.py)
BACKEND = "iptables"


def sh(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def ns_exec(ns: str, *cmd: str, check: bool = True, timeout: float = 30):
    return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


def links(ns: str) -> list[dict]:
    return json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show").stdout)


def addrs(ns: str) -> list[dict]:
    return json.loads(sh("ip", "-n", ns, "-j", "addr", "show").stdout)


def routes(ns: str) -> list[dict]:
    return json.loads(sh("ip", "-n", ns, "-j", "route", "show").stdout)


def ipv4_of(ns: str, ifname: str) -> list[str]:
    out = []
    for link in addrs(ns):
        if link["ifname"] == ifname:
            out += [
                f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"
            ]
    return out


def ping(src_ns: str, dst_ip: str, count: int = 1, wait: float = 1.0) -> bool:
    r = ns_exec(src_ns, "ping", "-c", str(count), "-W", str(wait), "-q", dst_ip, check=False)
    return r.returncode == 0


def netns_names() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line}


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


class Host:
    """A throwaway host namespace with agentd running in it."""

    def __init__(self, *extra_args: str) -> None:
        self.name = unique("host")
        self.dir = Path(tempfile.mkdtemp(prefix="netagent-e2e-"))
        self.socket = str(self.dir / "agent.sock")
        self.state_dir = str(self.dir / "state")
        self.extra_args = list(extra_args)
        if "--firewall" not in self.extra_args:
            self.extra_args += ["--firewall", BACKEND]
        self.backend = self.extra_args[self.extra_args.index("--firewall") + 1]
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "agentd.log"
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    # -- daemon -------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        argv = [
            "nsenter", f"--net=/run/netns/{self.name}", str(VENV_BIN / "agentd"),
            "--socket", self.socket, "--state-dir", self.state_dir, *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                with contextlib.suppress(Exception):
                    Client(self.socket, timeout=5).call("system.info")
                    return
            time.sleep(0.05)
        raise RuntimeError(f"agentd not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> Client:
        return Client(self.socket, timeout=30)

    def call(self, method: str, **params):
        return Client(self.socket, timeout=30).call(method, params or None)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = sh(str(VENV_BIN / "agentctl"), "--socket", self.socket, *args, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"agentctl {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    # -- observation ----------------------------------------------------------------------
    def iptables_save(self) -> str:
        """Rules only (no comments or counters), for exact comparisons; with the nftables
        backend, followed by the agent's table (`nft_table`)."""
        out = ns_exec(self.name, "iptables-save").stdout
        text = "\n".join(
            line for line in out.splitlines() if line and not line.startswith("#")
        ).replace("[0:0]", "")
        return text + self.nft_table() if self.backend == "nftables" else text

    def nft_table(self) -> str:
        """`nft list table inet netagent`, one line per rule and per set element (sorted), so
        that equal tables give equal text ("" without the table)."""
        r = ns_exec(self.name, "nft", "-s", "list", "table", "inet", "netagent", check=False)
        seen = parse_listing(r.stdout if r.returncode == 0 else "")
        out = [f"\nchain {c}: {rule}" for c in sorted(seen.chains) for rule in seen.chains[c]]
        out += [f"\nchain {c}" for c in sorted(seen.chains)]
        out += [f"\n{name}: {e}" for name in sorted(seen.elements) for e in seen.elements[name]]
        return "".join(sorted(out))

    def firewall_bridges(self) -> set[str]:
        """The bridges the firewall has rules for, whichever the backend (iptables: the
        dispatch to a network chain; nftables: the `bridges` set)."""
        if self.backend == "nftables":
            found = re.findall(r'^bridges: "([^"]+)"$', self.nft_table(), re.M)
        else:
            found = re.findall(
                r"^-A NETAGENT-FORWARD -o (\S+) -j NETAGENT-N-", self.iptables_save(), re.M
            )
        return set(found)

    def publishes(self, host_port: int) -> bool:
        """Whether a DNAT of `host_port` is in the kernel, whichever the backend."""
        if self.backend == "nftables":
            return f" . {host_port} : " in self.nft_table()
        return f"--dport {host_port} -j DNAT" in self.iptables_save()

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the agent's reaper has deleted every link it retired (a disconnect or
        network rm answers once the link is cut off; the kernel deletion follows in a batch)."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.call("system.info")["pending_deletions"]:
            assert time.monotonic() < deadline, "retired links not deleted in time"
            time.sleep(0.005)

    def links(self) -> list[dict]:
        self.settle()
        return links(self.name)

    def link_names(self) -> set[str]:
        return {link["ifname"] for link in self.links()}

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.stop(signal.SIGKILL, timeout=5)
        sh("ip", "netns", "del", self.name, check=False)


@contextlib.contextmanager
def running_host(*extra_args: str) -> Iterator[Host]:
    host = Host(*extra_args)
    try:
        host.start()
        yield host
    finally:
        host.close()


def add_outside(host: Host) -> tuple[str, str, str]:
    """An "outside" namespace linked to the host by a veth uplink (the host's upstream).

    Returns (outside ns, host uplink address, outside address): 10.99.0.1 and 10.99.0.2 on a
    link that exists only between these two private namespaces.
    """
    outside = unique("out")
    sh("ip", "netns", "add", outside)
    sh(
        "ip",
        "-n",
        host.name,
        "link",
        "add",
        "uplink0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        outside,
    )
    sh("ip", "-n", host.name, "addr", "add", "10.99.0.1/24", "dev", "uplink0")
    sh("ip", "-n", host.name, "link", "set", "uplink0", "up")
    sh("ip", "-n", outside, "addr", "add", "10.99.0.2/24", "dev", "eth0")
    sh("ip", "-n", outside, "link", "set", "eth0", "up")
    sh("ip", "-n", outside, "link", "set", "lo", "up")
    return outside, "10.99.0.1", "10.99.0.2"
