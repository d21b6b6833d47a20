"""The request hook (`frontends/jsonrpc/observe`) and the metrics' protocol instrumentation,
without a daemon (tests/e2e/test_metrics.py scrapes a real agentd)."""

from __future__ import annotations

from typing import Protocol

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from agent.core.errors import Conflict
from agent.frontends.jsonrpc import observe
from agent.frontends.jsonrpc import protocol as p
from agent.metrics import Metrics

KERNEL = "netagent_kernel_call_duration_seconds_count"


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_observed_outcomes_and_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[dict] = []

    class Recorder:  # the audit log (structlog's cached loggers outlive a captured stderr)
        def info(self, event: str, **kw: object) -> None:
            lines.append({"event": event, **kw})

    monkeypatch.setattr(observe, "log", Recorder())
    seen: list[tuple[str, str]] = []

    async def ok(params):
        return "done"

    async def taken(params):
        raise Conflict("name taken")

    async def broken(params):
        raise RuntimeError("bug")

    async def slow(params):
        await trio.sleep(10)

    table = observe.observed(
        {"network.create": ok, "network.remove": taken, "network.prune": broken,
         "network.list": ok, "endpoint.connect": slow},
        lambda method, outcome, seconds: seen.append((method, outcome)),
    )  # fmt: skip
    params = p.NetworkCreate(name="n")
    assert await table["network.create"](params) == "done"
    with pytest.raises(Conflict):
        await table["network.remove"](params)
    with pytest.raises(RuntimeError):
        await table["network.prune"](params)
    assert await table["network.list"](params) == "done"
    with trio.move_on_after(0.01):
        await table["endpoint.connect"](params)
    assert seen == [
        ("network.create", "ok"), ("network.remove", "conflict"), ("network.prune", "internal"),
        ("network.list", "ok"), ("endpoint.connect", "cancelled"),
    ]  # fmt: skip
    audit = [line for line in lines if line["event"] == "audit"]
    assert [(a["method"], a["outcome"]) for a in audit] == [
        ("network.create", "ok"),
        ("network.remove", "conflict"),
        ("network.prune", "internal"),
        ("endpoint.connect", "cancelled"),
    ]  # fmt: skip  (network.list is read-only: not audited)
    assert audit[0]["params"]["name"] == "n"


async def test_instrument_times_protocol_coroutines_only() -> None:
    class Proto(Protocol):
        async def work(self, x: int) -> int: ...
        async def fail(self) -> None: ...
        def plain(self) -> int: ...
        async def serve(self) -> None: ...

    class Impl:
        async def work(self, x: int) -> int:
            return x * 2

        async def fail(self) -> None:
            raise OSError("boom")

        def plain(self) -> int:
            return 7

        async def other(self) -> int:
            return 1

        async def serve(self) -> None:
            return None

    m = Metrics()
    impl = Impl()
    m.instrument(impl, Proto, m.kernel_seconds)
    assert await impl.work(21) == 42
    with pytest.raises(OSError, match="boom"):
        await impl.fail()
    assert impl.plain() == 7 and await impl.other() == 1
    await impl.serve()
    got = _samples(m.text().decode())
    assert value(got, KERNEL, call="work", outcome="ok") == 1
    assert value(got, KERNEL, call="fail", outcome="error") == 1
    assert not any(dict(labels).get("call") in ("plain", "other", "serve") for _, labels in got)
