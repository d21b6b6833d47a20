"""The fakes the service tests use are held to the protocols they fake, and so are the real
implementations: same members, same signatures. A fake that drifts from its protocol would
let a service test pass against an interface the daemon does not have."""

from __future__ import annotations

import pytest

from agent.daemon import Namespaces as NetnsFiles
from agent.firewall.base import Firewall
from agent.kernel.base import Kernel, Namespaces
from tests.conformance import assert_implements
from tests.core.fakes import FakeFirewall, FakeKernel, FakeNamespaces


@pytest.mark.parametrize(
    ("fake", "protocol"),
    [
        (FakeKernel, Kernel),
        (FakeFirewall, Firewall),
        (FakeNamespaces, Namespaces),
        (NetnsFiles, Namespaces),  # the real one (the kernel's and the firewall's: test_jobs,
    ],  # test_firewall)
    ids=["kernel", "firewall", "namespaces", "real-namespaces"],
)
def test_fakes_implement_their_protocol(fake: type, protocol: type) -> None:
    assert_implements(fake(), protocol)


def test_the_check_catches_a_drifted_fake() -> None:
    class Drifted(FakeKernel):
        async def attach(self, att, extra):  # type: ignore[override]
            return True

    with pytest.raises(AssertionError, match="attach"):
        assert_implements(Drifted(), Kernel)
    with pytest.raises(AssertionError, match="resolve"):
        assert_implements(object(), Namespaces)
