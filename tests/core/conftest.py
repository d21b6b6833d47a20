"""Fixtures of the service tests: a `Service` over the fakes of tests/core/fakes.py and a real
store in a temporary directory, with its reaper running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from agent.core.bitmap import RangeAllocator
from agent.core.topology import Topology
from agent.service import Service
from agent.store.sqlite import open_store
from tests.core.fakes import FakeFirewall, FakeKernel, FakeNamespaces


@pytest.fixture
async def svc(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Service]:
    with open_store(tmp_path) as store:
        service = Service(
            topo=Topology(RangeAllocator),
            kernel=FakeKernel(),
            firewall=FakeFirewall(),
            namespaces=FakeNamespaces(),
            store=store,
        )
        await nursery.start(service.reaper.serve)
        yield service
