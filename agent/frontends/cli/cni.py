"""`agentctl cni install`: the CNI plugin executable and a conflist, where a runtime looks.

Writes `netagent` into the bin dir (the C client built at install, `_fast/cni/netagent`, or,
without it, a launcher of its pure-Python twin `agent.frontends.cni.plugin`) and
`netagent-NAME.conflist` into the conf dir, naming the socket agentctl used. Both are written
to a temporary name and renamed, so a runtime never reads half a file.
"""

from __future__ import annotations

import argparse
import os
import sys

from agent.frontends.cli import output as out

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NATIVE = os.path.join(ROOT, "_fast", "cni", "netagent")
CAPABILITIES = {"portMappings": True, "ips": True, "mac": True}


def conflist(network: str, socket: str) -> dict[str, Any]:
    """The configuration list a runtime reads (the contract of issue 14)."""
    plugin = {"type": "netagent", "network": network, "socket": socket,
              "capabilities": dict(CAPABILITIES)}  # fmt: skip
    return {"cniVersion": "1.0.0", "name": network, "plugins": [plugin]}


def launcher() -> bytes:
    """The Python fallback executable: isolated mode, no site (stdlib only), fast start."""
    return (
        f"#!{sys.executable} -IS\n"
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from agent.frontends.cni.plugin import main\n"
        "sys.exit(main())\n"
    ).encode()


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def install(bin_dir: str, conf_dir: str, network: str, socket: str,
            native: str | None = NATIVE) -> dict[str, str]:  # fmt: skip
    """Write the plugin and the conflist; returns what was written (plugin, kind, conflist)."""
    import json

    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(conf_dir, exist_ok=True)
    plugin = os.path.join(bin_dir, "netagent")
    if native is not None and os.access(native, os.X_OK):
        with open(native, "rb") as f:
            _write(plugin, f.read(), 0o755)
        kind = "native"
    else:
        _write(plugin, launcher(), 0o755)
        kind = "python"
    conf = os.path.join(conf_dir, f"netagent-{network}.conflist")
    _write(conf, (json.dumps(conflist(network, socket), indent=2) + "\n").encode(), 0o644)
    return {"plugin": plugin, "kind": kind, "conflist": conf}


def cmd_cni_install(client: Any, args: argparse.Namespace) -> int:
    client.call("network.inspect", {"network": args.network})  # it exists (else not found)
    done = install(args.bin_dir, args.conf_dir, args.network, os.path.abspath(client.path))
    return out.show(args, done, lambda d: sys.stdout.write(
        f"{d['plugin']} ({d['kind']})\n{d['conflist']}\n"))  # fmt: skip


def args_cni_install(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bin-dir", default="/opt/cni/bin", metavar="DIR",
                   help="where runtimes look for plugins (default: /opt/cni/bin)")  # fmt: skip
    p.add_argument("--conf-dir", default="/etc/cni/net.d", metavar="DIR",
                   help="where runtimes look for conflists (default: /etc/cni/net.d)")  # fmt: skip
    p.add_argument("--network", default="bridge", metavar="NAME",
                   help="the agent network the conflist names (default: bridge)")  # fmt: skip
