"""The fakes the service tests use are held to the protocols they fake, and so are the real
implementations: same members, same signatures. A fake that drifts from its protocol would
let a service test pass against an interface the daemon does not have."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from agent.firewall.base import Firewall
from agent.kernel.base import Kernel, Namespaces
from tests.core.fakes import FakeFirewall, FakeKernel, FakeNamespaces


def protocol_members(protocol: type) -> dict[str, Any]:
    """The methods and attributes a Protocol declares (not those of `object`/`Protocol`)."""
    found: dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object,) or klass.__name__ in ("Protocol", "Generic"):
            continue
        found.update({k: v for k, v in vars(klass).items() if not k.startswith("_")})
        found.update(dict.fromkeys(getattr(klass, "__annotations__", {})))
    return found


def _shape(fn: Any) -> list[tuple[str, Any, bool]]:
    sig = inspect.signature(fn)
    return [
        (p.name, p.kind, p.default is not inspect.Parameter.empty)
        for p in sig.parameters.values()
        if p.name != "self"
    ]


def assert_implements(obj: Any, protocol: type) -> None:
    """`obj` has every member of `protocol`; its methods take the same parameters (names,
    kinds, which have defaults) and are coroutines exactly where the protocol's are."""
    for name, member in protocol_members(protocol).items():
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {name}"
        if not callable(member):
            continue
        mine = getattr(obj, name)
        assert _shape(mine) == _shape(member), f"{type(obj).__name__}.{name}: signature"
        assert inspect.iscoroutinefunction(mine) == inspect.iscoroutinefunction(member), (
            f"{type(obj).__name__}.{name}: async or not"
        )


@pytest.mark.parametrize(
    ("fake", "protocol"),
    [(FakeKernel, Kernel), (FakeFirewall, Firewall), (FakeNamespaces, Namespaces)],
    ids=["kernel", "firewall", "namespaces"],
)
def test_fakes_implement_their_protocol(fake: type, protocol: type) -> None:
    assert_implements(fake(), protocol)


def test_the_check_catches_a_drifted_fake() -> None:
    class Drifted(FakeKernel):
        async def attach(self, att, extra):  # type: ignore[override]
            return True

    with pytest.raises(AssertionError, match="attach"):
        assert_implements(Drifted(), Kernel)
    with pytest.raises(AssertionError, match="lacks"):
        assert_implements(object(), Namespaces)
