"""agent.firewall: backends by name, and the `Firewall` protocol kept by the backend and by the
service tests' fake (tests/conformance.py compares names and signatures)."""

from __future__ import annotations

import inspect
from typing import Protocol

import pytest

from agent.core.errors import InvalidArgument
from agent.firewall import BACKENDS, create
from agent.firewall.base import Firewall
from agent.firewall.iptables.backend import IptablesFirewall
from agent.firewall.nftables.backend import NftablesFirewall
from tests.conformance import assert_implements
from tests.core.fakes import FakeFirewall


def test_create_knows_iptables_first_and_nftables() -> None:
    assert BACKENDS[:2] == ("iptables", "nftables")
    for kind in BACKENDS:
        fw = create(kind)
        assert fw.name == kind
    assert isinstance(create("iptables"), IptablesFirewall)
    assert isinstance(create("nftables"), NftablesFirewall)


def test_an_unknown_backend_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"'pf'.*known: iptables, nftables") as info:
        create("pf")
    assert info.value.data == {"firewall": "pf"}


@pytest.mark.parametrize(
    "make",
    [IptablesFirewall.default, NftablesFirewall.default, FakeFirewall],
    ids=["iptables", "nftables", "service-fake"],
)
def test_backend_and_fake_implement_the_firewall_protocol(make: type) -> None:
    assert_implements(make(), Firewall)


class Small(Protocol):
    name: str

    async def go(self, a: int, *, b: str = "x") -> int: ...

    def show(self) -> str: ...


class Good:
    name = "good"

    async def go(self, a: int, *, b: str = "x") -> int:
        return a

    def show(self):  # unannotated: accepted
        return ""


async def _show(self) -> str:
    return ""


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"name": None}, "name: missing"),
        ({"show": None}, "show: missing"),
        ({"go": lambda self, a, *, b="x": a}, "go: must be async"),
        ({"show": _show}, "show: must be a plain function"),
    ],
)
def test_assert_implements_reports_what_differs(change: dict, problem: str | None) -> None:
    attrs = {k: v for k, v in vars(Good).items() if not k.startswith("__")}
    for key, value in change.items():
        if value is None:
            del attrs[key]
        else:
            attrs[key] = value
    obj = type("Changed", (), attrs)()
    if problem is None:
        assert_implements(obj, Small)
    else:
        with pytest.raises(AssertionError, match=problem):
            assert_implements(obj, Small)


async def _renamed(self, amount: int, *, b: str = "x") -> int:
    return amount


async def _default(self, a: int, *, b: str = "y") -> int:
    return a


async def _positional(self, a: int, b: str = "x") -> int:
    return a


async def _annotated(self, a: str, *, b: str = "x") -> int:
    return 0


async def _returns(self, a: int, *, b: str = "x") -> str:
    return ""


@pytest.mark.parametrize(
    ("go", "problem"),
    [
        (_renamed, "differs from the protocol's"),
        (_default, "differs from the protocol's"),
        (_positional, "differs from the protocol's"),
        (_annotated, "parameter a is annotated 'str', not 'int'"),
        (_returns, "returns 'str', not 'int'"),
    ],
)
def test_assert_implements_compares_signatures(go: object, problem: str) -> None:
    obj = type("Changed", (Good,), {"go": go})()
    assert inspect.iscoroutinefunction(obj.go)
    with pytest.raises(AssertionError, match=problem):
        assert_implements(obj, Small)
