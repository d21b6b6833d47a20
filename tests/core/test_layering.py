"""The structure stays as designed (in the style of trio's test_exports), read from the source:

- the pure modules (the core, the wire protocol, the iptables renderer) import no I/O;
- each layer imports only the layers below it (`LAYERS`), so front ends and shells never reach
  into each other and the service depends on the shells' protocols, not their implementations;
- there is no import circle anywhere in `agent/`;
- no module is longer than `MAX_LINES`.

Imports are read with `ast`, including those inside functions (agentctl's lazy imports are
still dependencies) but not those under `if TYPE_CHECKING:` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "agent"
MAX_LINES = 450

IO_MODULES = {
    "trio", "pyroute2", "sqlite3", "subprocess", "socket", "_socket", "structlog", "os",
    "time", "threading", "_thread", "asyncio", "ctypes", "fcntl", "select", "selectors",
    "signal", "shutil", "logging", "pickle", "multiprocessing", "concurrent", "outcome",
}  # fmt: skip
PURE_PACKAGES = ("agent.core",)
PURE_MODULES = (
    "agent.frontends.jsonrpc.protocol",
    "agent.firewall.iptables.rules",
    "agent.firewall.iptables.transaction",
    "agent.firewall.iptables.serialize",
    "agent.firewall.iptables.save",
    "agent.frontends.docker.wire",
    "agent.frontends.docker.convert",
    "agent.frontends.cni.spec",
    "agent.firewall.nftables.render",
    "agent.firewall.nftables.script",
)

#: module prefix -> the agent modules it may import (besides itself and its own package)
LAYERS: dict[str, tuple[str, ...]] = {
    "agent.core": ("agent.core",),
    "agent.log": (),
    "agent.accel": (
        "agent.core", "agent.firewall.iptables.serialize", "agent.dns.udpbatch",
    ),  # pure twins
    "agent.store": ("agent.core", "agent.log", "agent.store"),
    "agent.kernel": ("agent.core", "agent.accel", "agent.log", "agent.kernel"),
    # the nftables monitor shares the kernel's non-blocking netlink reader (`kernel.events`)
    "agent.firewall": (
        "agent.core", "agent.accel", "agent.log", "agent.firewall", "agent.kernel.events",
    ),
    # the service sees the shells through their protocols only
    "agent.service": (
        "agent.core", "agent.log", "agent.store", "agent.service", "agent.kernel.base",
        "agent.firewall.base",
    ),
    "agent.frontends": (),
    "agent.frontends.jsonrpc.protocol": ("agent.core",),
    "agent.frontends.jsonrpc.client": ("agent.core.errors",),
    "agent.frontends.cli": (
        "agent.frontends.cli", "agent.frontends.jsonrpc.client", "agent.core.errors",
        "agent.core.options",
    ),
    "agent.frontends.jsonrpc": (
        "agent.core", "agent.log", "agent.frontends.jsonrpc", "agent.service",
        "agent.frontends.cni.commands",
    ),
    "agent.frontends.docker": (
        "agent.core", "agent.log", "agent.frontends.docker", "agent.service",
        "agent.frontends.jsonrpc.server",
    ),
    # the DNS server reads the topology and the bus's events (values of the core)
    "agent.dns": ("agent.core", "agent.accel", "agent.log", "agent.dns"),
    # CNI: `spec` pure, `commands` calls the service; `plugin` (the client twin) stdlib only
    "agent.frontends.cni": ("agent.core", "agent.log", "agent.service", "agent.frontends.cni"),
    "agent.frontends.cni.plugin": (),
    "agent.systemd": ("agent.log",),
    "agent.metrics": ("agent.log",),
    "agent.daemon": ("agent",),
    "agent.lockfile": (),
    "agent.preflight": (),
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(AGENT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (`from a.b import c` counts `a.b.c` when that is a module
    of ours), outside `if TYPE_CHECKING:` blocks."""
    names: set[str] = set()
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            names.update(submodules)
            if len(submodules) < len(node.names):  # names defined in `base` itself
                names.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _pure(name: str) -> bool:
    return any(_within(name, p) for p in PURE_PACKAGES) or name in PURE_MODULES


@pytest.mark.parametrize("name", [n for n in MODULES if _pure(n)])
def test_pure_module_imports_no_io(name: str) -> None:
    bad = {m for m in GRAPH[name] if any(_within(m, io) for io in IO_MODULES)}
    bad |= {m for m in GRAPH[name] if _within(m, "agent") and not _pure(m)}
    assert not bad, f"{name} imports {sorted(bad)}"


def _layer(name: str) -> str:
    return max((p for p in LAYERS if _within(name, p)), key=len)


@pytest.mark.parametrize("name", [n for n in MODULES if n != "agent"])
def test_each_layer_imports_only_what_is_below_it(name: str) -> None:
    allowed = LAYERS[_layer(name)]
    ours = {m for m in GRAPH[name] if _within(m, "agent") and m != "agent"}
    bad = {m for m in ours if not any(_within(m, a) for a in allowed)}
    assert not bad, f"{name} ({_layer(name)}) imports {sorted(bad)}"


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components over the modules of `agent`."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v] & MODULES.keys()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            connect(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_short_enough_to_read_in_one_sitting(name: str) -> None:
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES})"


def test_the_checks_see_the_modules() -> None:
    assert {"agent.core.model", "agent.core.plan", "agent.service.endpoints"} <= MODULES.keys()
    assert "agent.core.naming" in GRAPH["agent.core.plan"]
    assert "agent.kernel.base" in GRAPH["agent.service.context"]
