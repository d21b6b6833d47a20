"""Run the CNI plugin as a runtime does: a process per call, CNI_* in its environment, the
configuration on stdin. Both clients: the C executable built at install and the Python
launcher `agentctl cni install` writes without a compiler."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

from agent.frontends.cli import cni as cni_install

NATIVE = cni_install.NATIVE
_PY_DIR = tempfile.mkdtemp(prefix="netagent-cni-py-")
PYTHON = cni_install.install(_PY_DIR, _PY_DIR, "unused", "/unused", native=None)["plugin"]
CLIENTS = {"native": NATIVE, "python": PYTHON}


def conf(host_socket: str, network: str, version: str = "1.0.0", **fields: Any) -> dict:
    """One plugin's configuration as a runtime passes it (the conflist's, flattened)."""
    return {"cniVersion": version, "name": network, "type": "netagent", "network": network,
            "socket": host_socket, **fields}  # fmt: skip


def run(plugin: str, command: str, stdin: dict | bytes, *, container: str = "",
        netns: str = "", ifname: str = "", extra_env: dict[str, str] | None = None,
        host_ns: str | None = None) -> tuple[int, bytes]:  # fmt: skip
    """Run `plugin` as a runtime does (in the host namespace `host_ns`, as agentd, if given)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_PATH": "/usr/lib/cni"}  # fmt: skip
    if container:
        env["CNI_CONTAINERID"] = container
    if netns:
        env["CNI_NETNS"] = netns
    if ifname:
        env["CNI_IFNAME"] = ifname
    env.update(extra_env or {})
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    argv = [plugin] if host_ns is None else ["nsenter", f"--net=/run/netns/{host_ns}", plugin]
    r = subprocess.run(argv, input=data, env=env, capture_output=True, timeout=60)
    return r.returncode, r.stdout


def call(plugin: str, command: str, stdin: dict | bytes, **kw: Any) -> tuple[int, Any]:
    """`run`, stdout decoded (None when empty)."""
    rc, out = run(plugin, command, stdin, **kw)
    return rc, (json.loads(out) if out.strip() else None)
