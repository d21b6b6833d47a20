"""The few /proc/sys/net settings the kernel worker writes: forwarding, and IPv6 per link.

Theory of operation: these are files, not netlink, and the writes that matter run in the owner
thread on the attach path, so they go through `os.open`/`os.write` (a text-mode `open()` costs
~10 us more in Python). Only the host namespace's /proc/sys is written: a write to a
container namespace's /proc/sys/net made every later /proc/sys lookup walk one cached dentry
per namespace visited (17 ms an attach among 10,000), so the container side uses netlink
instead (`rtnl.set_no_ipv6_addresses`).
"""

from __future__ import annotations

import contextlib
import os

from agent.log import get_logger

log = get_logger("agent.kernel")

_ipv6_warned = False


def disable_ipv6(ifname: str) -> None:
    """No IPv6 on a link that is still down: a bridge port (host veth end) forwards frames and
    needs no address of its own, nor does an IPv4-only network's bridge. Otherwise each gets a
    link-local address and routes, sends DAD/MLD/RS packets when it comes up, and every link
    going up or down walks the whole IPv6 routing table: with 10,000 endpoints on 1,000
    networks, an attach took ~35x longer than with one (measured; 1.1-1.4x without them).
    Nothing to do when IPv6 is off in the kernel or the MTU is below IPv6's minimum (no entry).

    Error handling:
        Best effort: a failure (read-only /proc/sys) costs only speed, so it is logged, once
        per process.
    """
    global _ipv6_warned
    try:
        fd = os.open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not _ipv6_warned:
            _ipv6_warned = True
            log.warning("veth.disable_ipv6.failed", ifname=ifname, error=str(exc))


def enable_ipv6_without_dad(ifname: str) -> None:
    """IPv6 on, duplicate address detection off, on bridge `ifname` (best effort).

    accept_dad=0 matters: until the bridge's link-local address leaves DAD (~1 s after the
    bridge comes up), a neighbour solicitation for forwarded traffic (DNAT to a container)
    goes out with source `::`, which the container takes for a DAD probe and leaves
    unanswered.
    """
    for key, value in (("disable_ipv6", "0"), ("accept_dad", "0")):
        path = f"/proc/sys/net/ipv6/conf/{ifname}/{key}"
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(value)


def set_ip_forward() -> None:
    """net.ipv4.ip_forward = 1."""
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")


def set_ip6_forward() -> None:
    """net.ipv6.conf.all.forwarding = 1. Interfaces then ignore router advertisements unless
    their accept_ra is 2 (as with Docker)."""
    with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
        f.write("1\n")
