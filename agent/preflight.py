"""Start-up checks that name what is missing and how to get it, before anything is touched.

Each firewall backend needs command-line tools (`TOOLS`); `check_tools` finds each on PATH and
runs its `--version`, so a missing or broken tool stops agentd at once with the tool's name and
the Debian package that provides it, instead of failing deep inside the first transaction.
"""

from __future__ import annotations

import shutil
import subprocess

#: backend name -> (tool, Debian package) it cannot start without
TOOLS: dict[str, tuple[tuple[str, str], ...]] = {
    "iptables": (("iptables-restore", "iptables"), ("iptables-save", "iptables")),
    "nftables": (("nft", "nftables"),),
}
VERSION_TIMEOUT = 10.0


class MissingTool(Exception):
    """A tool the chosen firewall backend needs is missing or does not run."""

    def __init__(self, tool: str, package: str, why: str) -> None:
        super().__init__(
            f"{tool} {why}; the {tool!r} firewall tool is needed "
            f"(Debian/Ubuntu: apt-get install {package})"
        )
        self.tool = tool
        self.package = package


def check_tools(backend: str) -> None:
    """Every tool `backend` needs is on PATH and answers `--version`.

    Raises:
        MissingTool: the first tool that is missing or broken.
    """
    for tool, package in TOOLS.get(backend, ()):
        path = shutil.which(tool)
        if path is None:
            raise MissingTool(tool, package, "was not found on PATH")
        try:
            run = subprocess.run(
                [path, "--version"], capture_output=True, timeout=VERSION_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MissingTool(tool, package, f"({path}) does not run: {exc}") from exc
        if run.returncode != 0:
            err = run.stderr.decode(errors="replace").strip().splitlines()
            detail = err[-1] if err else f"exit status {run.returncode}"
            raise MissingTool(tool, package, f"({path}) is broken: {detail}")
