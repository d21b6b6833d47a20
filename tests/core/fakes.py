"""Fakes of the shells the service uses (not mocks): the kernel, the firewall, namespaces.

Each fake implements its protocol (`agent.kernel.base.Kernel`, `agent.kernel.base.Namespaces`,
`agent.firewall.base.Firewall`) with the same method names and signatures, which
tests/core/test_fakes.py checks, and keeps what it was asked to do in plain attributes so that
tests can fail any step on purpose and check that nothing was half-applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import trio

from agent.core.attach import Attachment, Bridge
from agent.core.errors import Conflict, FirewallApply, KernelError, NotFound
from agent.core.policy import Policy
from agent.firewall.monitor import NftChange
from agent.kernel.base import LinkInfo


class FakeKernel:
    """Bridges by name (-> gateway CIDR), veths by host name (-> Attachment)."""

    def __init__(self) -> None:
        self.bridges: dict[str, str | None] = {}
        self.veths: dict[str, Attachment] = {}
        self.fail_attach = False
        self.fail_bridge = False
        self.fail_retire = False
        self.ipv6_disabled: set[str] = set()  # namespace paths with IPv6 off
        self.routes: list[ipaddress.IPv4Network] = []
        self.dying: set[str] = set()
        self.reap_gate: trio.Event | None = None
        self.ip6_forward = False
        self.states: dict[str, tuple[bool, int]] = {}  # link_state answers
        self.enslaved: list[str] = []
        self.links: list[LinkInfo] = []  # owned_links answers
        self.aliases: dict[str, str] = {}  # set_alias calls: link -> its latest mark
        self.fail_alias = False
        self.in_host: set[str] = set()  # veths made by attach_host (both ends here)
        self.inside: dict[tuple[str, str], list[str]] = {}  # addresses_in answers

    async def ensure_bridge(self, bridge: Bridge) -> int:
        await trio.sleep(0)
        if self.fail_bridge:
            raise Conflict(f"{bridge.name} is a veth, not a bridge", bridge=bridge.name)
        self.bridges[bridge.name] = bridge.address
        return len(self.bridges)

    async def delete_bridge(self, bridge: Bridge, *, retire: bool = False) -> bool:
        return self.bridges.pop(bridge.name, None) is not None

    async def attach(self, att: Attachment) -> bool:
        if self.fail_attach:
            raise KernelError("attach failed on purpose")
        self.veths[att.host_ifname] = att
        return att.netns not in self.ipv6_disabled

    async def attach_host(self, att: Attachment) -> bool:
        if self.fail_attach:
            raise KernelError("attach failed on purpose")
        self.veths[att.host_ifname] = att
        self.in_host.add(att.host_ifname)
        return True

    async def detach(self, host_ifname: str) -> bool:
        return self.veths.pop(host_ifname, None) is not None

    async def set_alias(self, name: str, alias: str) -> None:
        if self.fail_alias:
            raise KernelError("set alias failed on purpose")
        self.aliases[name] = alias

    async def retire(self, host_ifname: str) -> bool:
        if self.fail_retire:
            raise KernelError("retire failed on purpose")
        if host_ifname not in self.veths:
            return False
        self.dying.add(host_ifname)
        return True

    async def reap(self, bridges: Sequence[Bridge] = ()) -> bool:
        if self.reap_gate is not None:
            await self.reap_gate.wait()
        for bridge in bridges:
            self.bridges.pop(bridge.name, None)
        for name in self.dying:
            self.veths.pop(name, None)
        found, self.dying = bool(self.dying), set()
        return found

    async def enslave(self, host_ifname: str, bridge: str) -> None:
        self.enslaved.append(host_ifname)

    async def link_state(self, name: str) -> tuple[bool, int] | None:
        return self.states.get(name)

    async def owned_links(self) -> list[LinkInfo]:
        return list(self.links)

    async def host_routes(self) -> list[ipaddress.IPv4Network]:
        return list(self.routes)

    async def route_changes(self) -> tuple[str, list[str], list[str]]:
        return "full", [str(r) for r in self.routes], []

    async def addresses_in(self, netns_path: str, ifname: str) -> list[str] | None:
        return self.inside.get((netns_path, ifname))

    async def set_ip_forward(self) -> None:
        pass

    async def set_ip6_forward(self) -> None:
        self.ip6_forward = True


class FakeFirewall:
    """Remembers the last policy applied; `fail` makes the next applies fail."""

    name = "fake"

    def __init__(self) -> None:
        self.policy = Policy()
        self.fail = False
        self.applies = 0

    @property
    def networks(self) -> list[str]:
        """The bridges of the last policy applied (IPv4), sorted."""
        return sorted(n.bridge for n in self.policy.v4.networks)

    @property
    def forwards(self) -> int:
        return sum(len(f) for f in self.policy.v4.forwards.values())

    async def setup(self, policy: Policy) -> None:
        self.policy = policy

    async def apply(self, policy: Policy) -> int:
        await trio.lowlevel.checkpoint()  # a transaction takes time: others may interleave
        self.applies += 1
        if self.fail:
            raise FirewallApply("restore failed on purpose", line="-A X")
        self.policy = policy
        return 1

    async def repair(self, policy: Policy) -> list[str]:
        return []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def foreign(self, change: NftChange) -> bool:
        return False

    def bridge_recreated(self, bridge: str) -> None:
        pass

    def text(self) -> str:
        return ""

    def rule_count(self) -> int:
        return 0


class FakeNamespaces:
    """Any path under /run/netns/ok... exists (its key is its path); others do not."""

    def __init__(self) -> None:
        self.named: set[str] = set()
        self.gone: set[str] = set()
        self.resolv: dict[str, str] = {}  # name -> /etc/netns/NAME/resolv.conf

    def resolve(self, netns: str) -> str:
        return netns if netns.startswith("/") else f"/run/netns/{netns}"

    def netns_key(self, path: str) -> str:
        if not path.startswith("/run/netns/ok") or path in self.gone:
            raise NotFound(f"no namespace at {path}")
        return path

    async def create_named(self, name: str) -> str:
        self.named.add(name)
        return f"/run/netns/{name}"

    async def delete_named(self, name: str) -> bool:
        self.named.discard(name)
        return True

    def write_resolv_conf(self, name: str, text: str) -> None:
        self.resolv[name] = text

    def remove_resolv_conf(self, name: str) -> None:
        self.resolv.pop(name, None)
