"""A real dockerd (Debian's docker.io 20.10) next to agentd, inside the private test namespace.

`Dockerd` runs `/usr/sbin/dockerd` in a `Host`'s namespace (nsenter, like agentd) with its
state on a tmpfs (`--data-root`, `--exec-root`, its own containerd started by dockerd), its API
on a socket of its own, and, for the netagent driver, `--bridge=none --iptables=false`: every
rule and link of a netagent network is agentd's. dockerd finds the plugin where 20.10 looks,
`/run/docker/plugins/netagent.sock`; a tmpfs over `/run/docker` (and `/run/containerd`, so
that dockerd starts its own containerd) exists only in the tests' private mount namespace,
which `scripts/test.sh` (and bench/bench_docker.py) make with `unshare -m`.

The image is made locally: a tar of busybox-static and its applet links, `docker import`ed.
The client is `/usr/bin/docker` (20.10), not a newer one elsewhere on PATH.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.harness import Host, sh

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
BUSYBOX = "/bin/busybox"
PLUGIN_DIR = "/run/docker/plugins"
PLUGIN_SOCKET = f"{PLUGIN_DIR}/netagent.sock"
IMAGE = "netagent-busybox:latest"
APPLETS = ("sh", "ping", "sleep", "nc", "ip", "cat", "echo", "httpd", "wget", "ls", "true")


def private_mounts() -> None:
    """tmpfs over /run/docker and /run/containerd, in this (private) mount namespace only."""
    if not _private_mount_namespace():
        raise RuntimeError("refusing to mount over /run/docker in the host's mount namespace")
    for path in ("/run/docker", "/run/containerd"):
        os.makedirs(path, exist_ok=True)
        if not os.path.ismount(path):
            sh("mount", "-t", "tmpfs", "netagent-test", path)
    os.makedirs(PLUGIN_DIR, exist_ok=True)


def _private_mount_namespace() -> bool:
    """Not PID 1's mount namespace; where PID 1's cannot be read, the private namespace of
    scripts/test.sh and the benchmarks is known by its tmpfs on /run/netns."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except PermissionError:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == "/run/netns" and " - tmpfs " in line for line in f)


def busybox_tar() -> bytes:
    """An image root: /bin/busybox and links for `APPLETS`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return buf.getvalue()


class Dockerd:
    """dockerd in `host`'s namespace; `docker(...)` runs the 20.10 client against it."""

    def __init__(self, host: Host, *, bridge: bool = False) -> None:
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix="netagent-dockerd-"))
        sh("mount", "-t", "tmpfs", "netagent-dockerd", str(self.dir))
        self.sock = str(self.dir / "docker.sock")
        self.log_path = self.dir / "dockerd.log"
        self.bridge = bridge
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        net = ["--bridge=none", "--iptables=false", "--ip-masq=false", "--ip-forward=false"]
        if self.bridge:  # Docker's own bridge driver, the benchmark's peer
            net = ["--iptables=true", "--userland-proxy=true"]
        argv = [
            "nsenter", f"--net=/run/netns/{self.host.name}", DOCKERD,
            "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
            "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.sock}",
            "--storage-driver", "vfs", "--log-level", "warn", *net,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.log()}")
            if self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def docker(
        self, *args: str, check: bool = True, timeout: float = 60, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            input=stdin.decode("latin-1") if stdin is not None else None,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    def import_image(self) -> None:
        """`docker import` of the busybox root (`busybox_tar`) as `IMAGE`."""
        tar_path = self.dir / "busybox.tar"
        tar_path.write_bytes(busybox_tar())
        self.docker("import", str(tar_path), IMAGE)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            for cid in self.docker("ps", "-aq", check=False).stdout.split():
                self.docker("rm", "-f", cid, check=False)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        # containerd and its shims die with dockerd; the tmpfs goes after them
        for _ in range(50):
            if sh("umount", "-R", "-l", str(self.dir), check=False).returncode == 0:
                break
            time.sleep(0.1)


@contextlib.contextmanager
def running_dockerd(host: Host, *, bridge: bool = False) -> Iterator[Dockerd]:
    d = Dockerd(host, bridge=bridge)
    try:
        d.start()
        d.import_image()
        yield d
    finally:
        d.stop()
