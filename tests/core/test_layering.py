"""The pure core stays pure (in the style of trio's test_exports): no I/O module is imported
by `agent/core`, `agent/api/protocol` or the pure modules of the iptables backend (its renderer,
serialiser twin and iptables-save parser), and the core imports nothing from the shells. A pure
module may import another pure module, wherever it lives."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "trio",
    "pyroute2",
    "sqlite3",
    "subprocess",
    "socket",
    "structlog",
    "os",
    "time",
    "threading",
    "asyncio",
    "ctypes",
    "agent.kernel",
    "agent.firewall",
    "agent.store",
    "agent.service",
    "agent.daemon",
    "agent.api.server",
    "agent.api.client",
    "agent.accel",
}
IPTABLES = ROOT / "agent" / "firewall" / "iptables"
PURE = [
    *sorted((ROOT / "agent" / "core").glob("*.py")),
    ROOT / "agent" / "api" / "protocol.py",
    *(IPTABLES / f"{name}.py" for name in ("rules", "transaction", "serialize", "save")),
]
PURE_MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in PURE}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found = {f"{node.module}.{a.name}" for a in node.names}
            names |= found if found <= PURE_MODULES else {node.module}  # pure modules by name
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_pure_module_imports_no_io(path: Path) -> None:
    bad = {
        name
        for name in _imports(path) - PURE_MODULES
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_there_are_pure_modules_to_check() -> None:
    assert {p.name for p in PURE} >= {"model.py", "errors.py", "naming.py", "protocol.py"}
    assert all(p.exists() for p in PURE)
