"""Every e2e test runs once per firewall backend (`agentd --firewall`).

`backend` is module-scoped so that a module's shared host (a module-scoped fixture that asks
for `backend`) is started once per backend. A test that checks one backend's own rules
(iptables chains, the nftables table) says so with `@pytest.mark.backend("iptables")`; it is
skipped for the other.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.firewall import BACKENDS
from tests.e2e import harness


@pytest.fixture(params=BACKENDS, autouse=True, scope="module")
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    saved, harness.BACKEND = harness.BACKEND, request.param
    try:
        yield request.param
    finally:
        harness.BACKEND = saved


@pytest.fixture(autouse=True)
def _backend_only(request: pytest.FixtureRequest, backend: str) -> None:
    only = request.node.get_closest_marker("backend")
    if only is not None and backend not in only.args:
        pytest.skip(f"checks the {', '.join(only.args)} backend's own rules")
