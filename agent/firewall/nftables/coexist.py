"""Living beside iptables: the one accept rule in FORWARD, and each backend's leftovers.

Theory of operation. nf_tables runs every base chain registered on a hook; an `accept` ends
only its own chain, a `drop` anywhere ends the packet. So on a host where another tool (Docker)
set the iptables FORWARD policy to DROP, the agent's table accepting a flow is not enough. The
agent's table marks what it accepts (`render.MARK`, one bit of the packet mark), and one rule at
the top of iptables' and ip6tables' FORWARD accepts marked packets::

    -A FORWARD -m mark --mark 0x2000000/0x2000000 -m comment --comment netagent -j ACCEPT

It is inserted at start-up (and put back by `repair`), through iptables-nft like any other
iptables rule, and stays across restarts (no traffic cut); switching to the iptables backend
removes it with the table (`retire_nftables`), and switching to nftables removes the iptables
backend's chains and jumps (`retire_iptables`). Foreign rules are never touched.

Error handling: a missing iptables tool means there is no iptables FORWARD chain to cope with
(logged, not raised); the other failures are logged and reported as problems.
"""

from __future__ import annotations

import shutil
import subprocess

from agent.core import naming
from agent.firewall.nftables.render import FAMILY, MARK, TABLE
from agent.firewall.nftables.transport import NftError, Transport
from agent.log import get_logger

log = get_logger("agent.firewall.nftables")

TOOLS = ("iptables", "ip6tables")
TIMEOUT = 20.0
ACCEPT_RULE = (
    "-m", "mark", "--mark", f"0x{MARK:x}/0x{MARK:x}",
    "-m", "comment", "--comment", naming.RULE_COMMENT, "-j", "ACCEPT",
)  # fmt: skip


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is not None]


def ensure_forward_accept() -> list[str]:
    """Insert the marked accept at the top of FORWARD where missing (each family); returns
    one line per rule (re)inserted."""
    done = []
    for tool in _tools():
        if _run(tool, "-w", "-C", "FORWARD", *ACCEPT_RULE).returncode == 0:
            continue
        r = _run(tool, "-w", "-I", "FORWARD", "1", *ACCEPT_RULE)
        if r.returncode != 0:
            log.warning("firewall.coexist.failed", tool=tool, stderr=r.stderr.strip())
            continue
        done.append(f"{tool} FORWARD accept of marked packets inserted")
    return done


def remove_forward_accept() -> int:
    """Delete every copy of the marked accept (each family); returns how many went."""
    gone = 0
    for tool in _tools():
        while _run(tool, "-w", "-D", "FORWARD", *ACCEPT_RULE).returncode == 0:
            gone += 1
    return gone


def iptables_leftovers(saved: str) -> str:
    """The `iptables-restore --noflush` script deleting the iptables backend's footprint from
    `iptables-save` output: the tagged jumps in built-in chains (not the marked accept) and the
    `NETAGENT*` chains ("" when there is none)."""
    tag = f"--comment {naming.RULE_COMMENT} -j {naming.CHAIN_PREFIX}"
    sections: list[str] = []
    table = ""
    ops: list[str] = []
    chains: list[str] = []

    def close() -> None:
        if ops or chains:
            body = ops + [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]
            sections.append("\n".join([f"*{table}", *body, "COMMIT"]))

    for line in saved.splitlines():
        if line.startswith("*"):
            close()
            table, ops, chains = line[1:], [], []
        elif line.startswith(f":{naming.CHAIN_PREFIX}"):
            chains.append(line[1:].split(" ", 1)[0])
        elif (
            line.startswith("-A ")
            and tag in line
            and not line.split()[1].startswith(naming.CHAIN_PREFIX)
        ):
            ops.append("-D " + line[3:])
    close()
    return "\n".join(sections) + "\n" if sections else ""


def retire_iptables() -> list[str]:
    """Remove what the iptables backend left (switching to nftables); one line per family
    cleaned."""
    done = []
    for tool in _tools():
        saved = _run(f"{tool}-save")
        script = iptables_leftovers(saved.stdout) if saved.returncode == 0 else ""
        if not script:
            continue
        r = _run(f"{tool}-restore", "--noflush", stdin=script)
        if r.returncode != 0:
            log.warning("firewall.retire.failed", tool=tool, stderr=r.stderr.strip())
            continue
        done.append(f"{tool} chains of the iptables backend removed")
    return done


def retire_nftables(nft: Transport | None = None) -> bool:
    """Remove the nftables backend's table and marked accepts (switching to iptables);
    True if there was a table."""
    remove_forward_accept()
    if nft is None:
        if shutil.which("nft") is None:
            return False
        from agent.firewall.nftables.transport import create

        try:
            nft = create()
        except OSError:
            return False
    try:
        nft.run(f"delete table {FAMILY} {TABLE}\n")
    except NftError:
        return False  # no table
    return True
