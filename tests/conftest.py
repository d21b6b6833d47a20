"""Shared test fixtures.

Kernel tests (marked `kernel`) create real bridges, veths, namespaces and iptables rules. They
must never run in the host's own network namespace: `scripts/test.sh` runs the whole suite under
`unshare -n -m` with a tmpfs on /run/netns. A kernel test started anywhere else fails at once.
"""

from __future__ import annotations

import os

import pytest


def _in_private_netns() -> bool:
    """True when this process's netns differs from the host's.

    `scripts/test.sh` records the host's namespace (NETAGENT_HOST_NETNS) before `unshare`;
    without it, compare with PID 1's (which some sandboxes do not let us read, even as root).
    """
    mine = os.readlink("/proc/self/ns/net")
    host = os.environ.get("NETAGENT_HOST_NETNS")
    if host is None:
        try:
            host = os.readlink("/proc/1/ns/net")
        except OSError:
            return False
    return mine != host


@pytest.fixture(autouse=True)
def _kernel_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is None:
        return
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: run scripts/test.sh")
    if not _in_private_netns():
        pytest.fail(
            "refusing to touch the host's network: run kernel tests under scripts/test.sh "
            "(unshare -n -m)"
        )
