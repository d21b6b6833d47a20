"""Kernel side effects of published ports besides the rules: conntrack flush and route_localnet.

Conntrack: a NAT decision is taken once per flow, so removing a DNAT rule does not stop a flow
already DNATed (a UDP "connection" lives on as long as packets keep coming). After a mapping is
unpublished its entries are deleted with the conntrack tool (Debian `conntrack`), matched on
what the flow was NATed to: protocol, original destination port and reply source (the
container's address and port) -- other flows of the container are left alone.

route_localnet: the host's own connection to 127.0.0.1:PORT is DNATed to the container and
routed out of the bridge with source 127.0.0.1, which the kernel drops as martian unless
`net.ipv4.conf.<bridge>.route_localnet` is 1 (Docker sets it too when the userland proxy is off).
/proc/sys/net is per network namespace: the one of the process, the agent's.

Both are backend-neutral: `PortEffects` computes them from each policy a backend has applied.
"""

from __future__ import annotations

import bisect
import shutil

import trio

from agent.core.policy import FamilyPolicy, Forward, NetworkPolicy, Policy
from agent.log import get_logger

log = get_logger("agent.firewall.conntrack")

TIMEOUT = 10.0

Published = set[tuple[str, Forward]]  # (bridge, forward)


def route_localnet(bridge: str) -> bool:
    """Set `net.ipv4.conf.<bridge>.route_localnet=1`; False (logged) if the bridge is gone."""
    path = f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("firewall.route_localnet.failed", bridge=bridge, error=str(exc))
        return False
    return True


def flush_argv(f: Forward) -> list[str]:
    """`conntrack -D -p tcp --orig-port-dst H --reply-src C --reply-port-src P [--orig-dst IP]`."""
    argv = ["conntrack", "-D", "-p", f.protocol, "--orig-port-dst", str(f.host_port)]
    if ":" in f.address:
        argv += ["-f", "ipv6"]
    argv += ["--reply-src", f.address, "--reply-port-src", str(f.port)]
    if f.host_ip:
        argv += ["--orig-dst", f.host_ip]
    return argv


async def flush(forwards: list[Forward]) -> int:
    """Delete the conntrack entries of `forwards`; returns the calls that failed.

    Best effort: a missing tool or a failure is logged, never raised (the rules are gone
    already; stale entries then expire on their own timeouts). Exit status 1 with "0 flow
    entries" is the normal answer when nothing matched.
    """
    if shutil.which("conntrack") is None:
        log.warning("firewall.conntrack.missing", mappings=len(forwards))
        return len(forwards)
    failed = 0
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + TIMEOUT
        for f in forwards:
            result = await trio.run_process(
                flush_argv(f), capture_stdout=True, capture_stderr=True, check=False
            )
            stderr = result.stderr.decode(errors="replace")
            if result.returncode != 0 and "0 flow entries" not in stderr:
                failed += 1
                log.warning("firewall.conntrack.failed", argv=flush_argv(f), stderr=stderr)
    if scope.cancelled_caught:
        log.warning("firewall.conntrack.timeout", mappings=len(forwards))
    return failed


def published(family: FamilyPolicy) -> Published:
    """`(bridge, forward)` of every forward `family` holds.

    No walk over every network: each publishing network is found by bisection (a policy's
    networks are sorted by id), and only a policy that is not sorted (made by hand) is read
    whole.
    """
    if not family.forwards:
        return set()
    nets = family.networks
    bridges: dict[str, str] = {}
    for net_id in family.forwards:
        i = bisect.bisect_left(nets, net_id, key=_id)
        if i < len(nets) and nets[i].id == net_id:
            bridges[net_id] = nets[i].bridge
        elif any(n.id == net_id for n in nets):  # not sorted after all
            bridges = {n.id: n.bridge for n in nets}
            break
    return {
        (bridges[net], f) for net, forwards in family.forwards.items() if net in bridges
        for f in forwards
    }  # fmt: skip


def _id(net: NetworkPolicy) -> str:
    return net.id


def _order(item: tuple[str, Forward]) -> tuple[str, str, str, int, int, str]:
    bridge, f = item
    return bridge, f.address, f.protocol, f.host_port, f.port, f.host_ip


class PortEffects:
    """The published ports' side effects, kept in step with the last policy applied."""

    def __init__(self) -> None:
        self._v4: Published = set()
        self._v6: Published = set()

    async def applied(self, policy: Policy) -> None:
        """`policy` is in the kernel now: route_localnet on each bridge that gained an IPv4
        forward, conntrack flush of every forward that went away (best effort, logged)."""
        v4, v6 = published(policy.v4), published(policy.v6)
        for bridge in sorted({b for b, _ in v4 - self._v4}):
            route_localnet(bridge)
        gone = [*sorted(self._v4 - v4, key=_order), *sorted(self._v6 - v6, key=_order)]
        self._v4, self._v6 = v4, v6
        if gone:
            await flush([f for _, f in gone])

    def bridge_recreated(self, bridge: str) -> None:
        """A bridge came back (repair): its sysctls went with the old device; restore ours."""
        if any(b == bridge for b, _ in self._v4):
            route_localnet(bridge)
