"""Podman 4 with `network_backend = "cni"` runs real containers on netagent networks.

Hermetic: podman runs in the test host's namespace (where agentd is) with its own
containers.conf, storage.conf (vfs) and registries.conf in a temporary directory, `--root` and
`--runroot` there too, tmpfs over /var/lib/containers and /run/containers in this private
mount namespace; the image is made here from busybox-static (`podman import`), no registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import traffic
from tests.e2e.harness import Host, add_outside, running_host, sh

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]

IMAGE = "localhost/netagent-busybox:latest"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ping", "nc", "ip", "sleep", "cat", "echo", "ifconfig")


class Podman:
    """podman, configured into `root`, run in the namespace of `host`."""

    def __init__(self, host: Host, root: Path) -> None:
        self.host, self.root = host, root
        self.bin_dir, self.conf_dir = root / "bin", root / "net.d"
        for d in ("storage", "run", "tmp", "image/bin"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "containers.conf").write_text(
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{self.bin_dir}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{self.conf_dir}"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'runtime = "runc"\n'  # crun refuses hybrid cgroup hierarchies
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/tmp"\n'
            "[containers]\n"
            'log_driver = "k8s-file"\n'
            # podman asks for more open files and processes than a sandbox may grant
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        )
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
        )
        (root / "registries.conf").write_text("")
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
        }

    def __call__(self, *args: str, check: bool = True, timeout: float = 90) -> str:
        argv = ["nsenter", f"--net=/run/netns/{self.host.name}", "podman",
                "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                *args]  # fmt: skip
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r.stdout.strip()

    def import_busybox(self) -> None:
        image = self.root / "image"
        shutil.copy(BUSYBOX, image / "bin" / "busybox")
        for applet in APPLETS:
            (image / "bin" / applet).symlink_to("busybox")
        tar = self.root / "image.tar"
        sh("tar", "-C", str(image), "-cf", str(tar), ".")
        self("import", str(tar), IMAGE)

    def install(self, network: str) -> None:
        self.host.ctl("cni", "install", "--bin-dir", str(self.bin_dir), "--conf-dir",
                      str(self.conf_dir), "--network", network)  # fmt: skip

    def ip(self, container: str, network: str) -> str:
        return self("inspect", container, "--format",
                    f"{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}")  # fmt: skip


@contextlib.contextmanager
def podman_host() -> Iterator[tuple[Host, Podman]]:
    for path in ("/var/lib/containers", "/run/containers"):
        os.makedirs(path, exist_ok=True)
        sh("mount", "-t", "tmpfs", "netagent-test", path)
    root = Path(tempfile.mkdtemp(prefix="netagent-podman-"))
    try:
        with running_host() as host:
            pm = Podman(host, root)
            pm.import_busybox()
            try:
                yield host, pm
            finally:
                pm("rm", "-f", "-a", "-t", "0", check=False)
    finally:
        for path in ("/var/lib/containers", "/run/containers"):
            sh("umount", "-l", path, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_podman_containers_on_netagent_networks() -> None:
    with podman_host() as (host, pm):
        host.call("network.create", name="pa", subnet="10.81.0.0/24")
        host.call("network.create", name="pb", subnet="10.82.0.0/24")
        pm.install("pa")
        pm.install("pb")
        assert {"pa", "pb"} <= set(pm("network", "ls", "--format", "{{.Name}}").split())
        for name, net in (("a1", "pa"), ("a2", "pa"), ("b1", "pb")):
            pm("run", "-d", "--name", name, "--network", net, IMAGE, "sleep", "600")
        a1, a2, b1 = pm.ip("a1", "pa"), pm.ip("a2", "pa"), pm.ip("b1", "pb")
        assert a1.startswith("10.81.0.") and a2.startswith("10.81.0.") and b1.startswith("10.82.")
        eps = {e["ip"]: e for e in host.call("endpoint.list")}
        assert {a1, a2, b1} <= eps.keys() and eps[a1]["attachment"].endswith("/eth0")
        # two containers of one network ping each other; the other network is isolated
        pm("exec", "a1", "ping", "-c", "1", "-W", "2", a2)
        pm("exec", "a2", "ping", "-c", "1", "-W", "2", a1)
        with pytest.raises(AssertionError):
            pm("exec", "a1", "ping", "-c", "1", "-W", "1", b1)
        # podman rm releases the address
        pm("rm", "-f", "-t", "0", "a2")
        host.settle()
        assert a2 not in {e["ip"] for e in host.call("endpoint.list")}
        pm("rm", "-f", "-t", "0", "a1", "b1")
        host.settle()
        assert host.call("endpoint.list") == []


def test_podman_publish_reaches_a_server_from_another_namespace() -> None:
    with podman_host() as (host, pm):
        host.call("network.create", name="pp", subnet="10.83.0.0/24")
        pm.install("pp")
        outside, host_ip, _ = add_outside(host)
        try:
            pm("run", "-d", "--name", "web", "--network", "pp", "-p", "8480:80", IMAGE,
               "sh", "-c", "while true; do echo hello | nc -l -p 80; done")  # fmt: skip
            (ep,) = host.call("endpoint.list")
            assert [p["host_port"] for p in ep["ports"]] == [8480]
            assert traffic.tcp(outside, host_ip, 8480) == "hello"
            pm("rm", "-f", "-t", "0", "web")
            host.settle()
            assert host.call("endpoint.list") == []
            assert "8480" not in host.iptables_save()
        finally:
            sh("ip", "netns", "del", outside, check=False)
