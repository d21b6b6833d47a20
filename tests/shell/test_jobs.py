"""The two sides of the kernel worker agree: the client sends only jobs of the table, with
arguments the table's functions accept, as plain builtins; neither side imports the other.

No kernel here: the client talks to a recording connection, the worker's `serve` to a
socketpair in this process.
"""

from __future__ import annotations

import ast
import inspect
import pickle
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.core.attach import Attachment, Bridge
from agent.core.errors import InvalidArgument, KernelError
from agent.kernel import base, client, worker
from agent.kernel.jobs import FRAME, REAPER, AttachFields, BridgeFields, Job, lane_of
from agent.kernel.ops import JOBS

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "agent" / "kernel"

BRIDGE = Bridge("br-0123456789ab", "netagent:net:" + "ab" * 32, "172.18.0.1/16", "fd00::1/64")
ATTACHMENT = Attachment(
    netns="/run/netns/c1", bridge="br-0123456789ab", host_ifname="na0123456789abc",
    alias="netagent:ep:" + "cd" * 32, ifname="eth0", mac="02:42:AC:12:00:02", mtu=1500,
    address="172.18.0.2/16", gateway="172.18.0.1", address6="fd00::2/64", gateway6="fd00::1",
)  # fmt: skip


class Recorder:
    """A `WorkerConnection` that records what it is asked to send, and answers None."""

    def __init__(self) -> None:
        self.sent: list[tuple[Job, tuple[Any, ...]]] = []

    async def call(self, job: Job, args: tuple[Any, ...]) -> Any:
        pickle.dumps(args)  # what crosses the socket must pickle
        self.sent.append((job, args))
        return None

    async def serve(self) -> None:
        pass

    async def stop(self) -> None:
        pass


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("ensure_bridge", (BRIDGE,), {}),
    ("delete_bridge", (BRIDGE,), {}),
    ("delete_bridge", (Bridge("br-x"),), {"retire": True}),
    ("attach", (ATTACHMENT,), {}),
    ("attach_host", (ATTACHMENT,), {}),
    ("detach", ("na0123456789abc",), {}),
    ("retire", ("na0123456789abc",), {}),
    ("reap", (), {}),
    ("reap", ([BRIDGE, Bridge("br-x")],), {}),
    ("enslave", ("na0123456789abc", "br-0123456789ab"), {}),
    ("set_alias", ("na0123456789abc", "netagent:ep:" + "ab" * 32), {}),
    ("link_state", ("br-0123456789ab",), {}),
    ("owned_links", (), {}),
    ("host_routes", (), {}),
    ("ifnames_in", ("/run/netns/c1",), {}),
    ("addresses_in", ("/run/netns/c1", "eth0"), {}),
    ("set_ip_forward", (), {}),
    ("set_ip6_forward", (), {}),
]


@pytest.fixture
async def sent(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[tuple[Job, tuple]]]:
    """Every job the client sends: from `open_kernel` and each method in `CALLS`."""
    recorder = Recorder()

    async def start(*_: object) -> Recorder:
        return recorder

    monkeypatch.setattr(client, "start", start)
    async with client.open_kernel() as kernel:
        for name, args, kwargs in CALLS:
            await getattr(kernel, name)(*args, **kwargs)
    yield recorder.sent


def _builtin(value: object) -> bool:
    if isinstance(value, tuple | list):
        return all(_builtin(v) for v in value)
    return value is None or type(value) in (str, int, bool)


async def test_every_job_sent_is_in_the_table_and_accepts_its_arguments(sent) -> None:
    assert len(sent) >= len(CALLS)  # every call of the client sent its job
    for job, args in sent:
        assert job in JOBS
        inspect.signature(JOBS[job]).bind(object(), *args)  # TypeError if they disagree


async def test_the_client_sends_every_job_of_the_table(sent) -> None:
    assert {job for job, _ in sent} == set(JOBS) == set(Job)


async def test_values_cross_as_plain_tuples_of_their_fields(sent) -> None:
    """Never the Struct itself: unpickling one would validate it again in the owner thread."""
    assert all(_builtin(args) for _, args in sent), [a for _, a in sent if not _builtin(a)]
    by_job = {job: args for job, args in reversed(sent)}
    assert AttachFields._make(by_job[Job.ATTACH][0]) == AttachFields(
        *msgspec.structs.astuple(ATTACHMENT)
    )
    assert AttachFields._make(by_job[Job.ATTACH][0]).mac == "02:42:ac:12:00:02"  # canonical
    assert BridgeFields._make(by_job[Job.ENSURE_BRIDGE][0]).address6 == "fd00::1/64"


def test_the_wire_shapes_mirror_the_values() -> None:
    assert BridgeFields._fields == Bridge.__struct_fields__
    assert AttachFields._fields == Attachment.__struct_fields__


def test_the_client_implements_the_protocol_exactly() -> None:
    methods = {
        n for n, v in vars(base.Kernel).items() if inspect.isfunction(v) and not n.startswith("_")
    }
    assert len(methods) == 16  # attach_host: Docker's Join; addresses_in: CNI CHECK; route_changes
    for name in methods:
        ours, theirs = getattr(client.Kernel, name), getattr(base.Kernel, name)
        assert inspect.iscoroutinefunction(ours), name
        assert inspect.signature(ours) == inspect.signature(theirs), name


async def test_bad_names_fail_in_agentd_before_any_job(monkeypatch) -> None:
    recorder = Recorder()
    kernel = client.Kernel(recorder)  # type: ignore[arg-type]
    for call in (kernel.detach("x" * 16), kernel.retire("a b"), kernel.enslave("ok", "")):
        with pytest.raises(InvalidArgument):
            await call
    assert recorder.sent == []


def test_reap_runs_in_the_reaper_lane_and_the_rest_in_the_owner() -> None:
    assert {job for job in Job if lane_of(job) == REAPER} == {
        Job.OPEN_REAPER,
        Job.CLOSE_REAPER,
        Job.REAP,
    }


# --- the worker's end ----------------------------------------------------------------------


def _serving(table: dict[str, Callable[..., Any]]) -> tuple[socket.socket, threading.Thread]:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    thread = threading.Thread(target=worker.serve, args=(theirs, "target", table))
    thread.start()
    return ours, thread


def _ask(sock: socket.socket, ident: int, job: str, args: tuple[Any, ...]) -> tuple:
    frame = pickle.dumps((ident, job, args))
    sock.sendall(FRAME.pack(len(frame)) + frame)
    size = FRAME.unpack(sock.recv(FRAME.size, socket.MSG_WAITALL))[0]
    return pickle.loads(sock.recv(size, socket.MSG_WAITALL))


def test_serve_runs_the_table_and_refuses_a_job_it_does_not_have() -> None:
    ours, thread = _serving({"add": lambda target, a, b: (target, a + b)})
    try:
        assert _ask(ours, 1, "add", (2, 3)) == (1, True, ("target", 5))
        ident, ok, error = _ask(ours, 2, "no_such_job", ())
        assert (ident, ok, type(error)) == (2, False, KernelError)
        assert "no_such_job" in error.message
        assert _ask(ours, 3, "add", (1, 1)) == (3, True, ("target", 2))  # still serving
    finally:
        ours.close()
        thread.join(5)
    assert not thread.is_alive()


# --- layering ------------------------------------------------------------------------------


def _kernel_imports(path: Path) -> set[str]:
    """The `agent.kernel` modules that `path` imports (by module stem)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "agent.kernel":
                found |= {a.name for a in node.names}
            elif module.startswith("agent.kernel."):
                found.add(module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("agent.kernel.")
            }
    return found


GRAPH = {p.stem: _kernel_imports(p) for p in KERNEL.glob("*.py") if p.stem != "__init__"}


def _reach(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_circle_in_the_kernel_shell(module: str) -> None:
    assert module not in _reach(module)


def test_the_two_sides_share_only_jobs_and_base() -> None:
    agentd, child = _reach("client") | {"client"}, _reach("worker") | {"worker"}
    assert agentd & child <= {"jobs", "base"}, agentd & child
    assert {"ops", "rtnl", "netns"} <= child
    assert "connection" in agentd
