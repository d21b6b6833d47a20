"""A socket filter for the link event socket: the kernel delivers only what can call for a repair.

Under churn every attach and disconnect sends the event socket ten to twenty notifications,
and each one costs agentd's event loop a wake-up, a `recv` and a decode, though the reconciler
(`agent.service.reconcile`) acts on none of them: it ignores links going up, new addresses, the
bridge (AF_BRIDGE) view of ports, and links in the dying group (retired by the agent itself). This
classic BPF program drops exactly those in the kernel; what passes is what `keeps` says, which
the kernel test checks against the same notifications read unfiltered.

Message layout (host byte order; BPF loads are big-endian): nlmsghdr (16 bytes, the type at
4), then ifinfomsg (family at 16, flags at 24) and the attributes from 32. IFLA_GROUP is found
with the `SKF_AD_NLATTR` ancillary load, which returns the attribute's offset (0: absent).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys

from agent.core import naming
from agent.log import get_logger

log = get_logger("agent.kernel.repair_filter")

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR = 16, 17, 20
AF_BRIDGE = 7
IFF_UP = 0x1
IFLA_GROUP = 27
SO_ATTACH_FILTER = 26

_LITTLE = sys.byteorder == "little"
_TYPE = 4 if _LITTLE else 5  # the low byte of nlmsg_type (every RTM_* type is below 256)
_FAMILY = 16
_FLAGS = 24 if _LITTLE else 27  # the byte of ifi_flags that holds IFF_UP
_ATTRS = 32
_DYING = int.from_bytes(naming.DYING_GROUP.to_bytes(4, sys.byteorder), "big")

# classic BPF opcodes
_LDB, _LDW_IND, _LD_IMM, _LDX_IMM, _TAX = 0x30, 0x40, 0x00, 0x01, 0x07
_LDW_ABS, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06
_NLATTR = (-0x1000 + 12) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_NLATTR: A = nla_find(A, X)
_KEEP, _DROP = 0xFFFFFFFF, 0

# (code, jump if true, jump if false, k); a jump skips that many instructions
PROGRAM = (
    (_LDB, 0, 0, _TYPE),  # 0
    (_JEQ, 15, 0, RTM_NEWADDR),  # 1: new address -> drop
    (_JEQ, 2, 0, RTM_NEWLINK),  # 2: new link -> 5
    (_JEQ, 3, 0, RTM_DELLINK),  # 3: deleted link -> 7
    (_RET, 0, 0, _KEEP),  # 4: anything else (deleted address)
    (_LDB, 0, 0, _FLAGS),  # 5
    (_JSET, 10, 0, IFF_UP),  # 6: up -> drop
    (_LDB, 0, 0, _FAMILY),  # 7
    (_JEQ, 8, 0, AF_BRIDGE),  # 8: the bridge's view of a port -> drop
    (_LD_IMM, 0, 0, _ATTRS),  # 9
    (_LDX_IMM, 0, 0, IFLA_GROUP),  # 10
    (_LDW_ABS, 0, 0, _NLATTR),  # 11: A = offset of IFLA_GROUP, or 0
    (_JEQ, 3, 0, 0),  # 12: no group -> keep
    (_TAX, 0, 0, 0),  # 13
    (_LDW_IND, 0, 0, 4),  # 14: the group
    (_JEQ, 1, 0, _DYING),  # 15: dying -> drop
    (_RET, 0, 0, _KEEP),  # 16
    (_RET, 0, 0, _DROP),  # 17
)


def keeps(msgtype: int, family: int, flags: int, group: int | None) -> bool:
    """What `PROGRAM` lets through, for one notification (`group`: None if it has none)."""
    if msgtype == RTM_NEWADDR:
        return False
    if msgtype not in (RTM_NEWLINK, RTM_DELLINK):
        return True
    if msgtype == RTM_NEWLINK and flags & IFF_UP:
        return False
    return family != AF_BRIDGE and group != naming.DYING_GROUP


def attach(sock: socket.socket) -> bool:
    """Install `PROGRAM` on `sock` (a NETLINK_ROUTE socket); False, with a warning, if the
    kernel refuses it (the events it would drop are ignored downstream anyway: only slower)."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in PROGRAM)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(PROGRAM), ctypes.addressof(buf))  # the kernel copies it
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.warning("events.filter.refused", error=str(exc))
        return False
    return True
