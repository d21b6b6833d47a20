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
"""

from __future__ import annotations

import shutil

import trio

from agent.core.model import PortMapping
from agent.log import get_logger

log = get_logger("agent.firewall.conntrack")

TIMEOUT = 10.0


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


def flush_argv(ip: str, m: PortMapping) -> list[str]:
    """`conntrack -D -p tcp --orig-port-dst H --reply-src C --reply-port-src P [--orig-dst IP]`."""
    argv = ["conntrack", "-D", "-p", m.protocol, "--orig-port-dst", str(m.host_port)]
    if ":" in ip:
        argv += ["-f", "ipv6"]
    argv += ["--reply-src", ip, "--reply-port-src", str(m.container_port)]
    if m.host_ip:
        argv += ["--orig-dst", m.host_ip]
    return argv


async def flush(mappings: list[tuple[str, PortMapping]]) -> int:
    """Delete the conntrack entries of `(container ip, mapping)`s; returns the calls that failed.

    Best effort: a missing tool or a failure is logged, never raised (the rules are gone
    already; stale entries then expire on their own timeouts). Exit status 1 with "0 flow
    entries" is the normal answer when nothing matched.
    """
    if shutil.which("conntrack") is None:
        log.warning("firewall.conntrack.missing", mappings=len(mappings))
        return len(mappings)
    failed = 0
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + TIMEOUT
        for ip, m in mappings:
            result = await trio.run_process(
                flush_argv(ip, m), capture_stdout=True, capture_stderr=True, check=False
            )
            stderr = result.stderr.decode(errors="replace")
            if result.returncode != 0 and "0 flow entries" not in stderr:
                failed += 1
                log.warning("firewall.conntrack.failed", argv=flush_argv(ip, m), stderr=stderr)
    if scope.cancelled_caught:
        log.warning("firewall.conntrack.timeout", mappings=len(mappings))
    return failed
