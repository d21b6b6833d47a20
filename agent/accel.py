"""Choose the Cython accelerators in `_fast/` or their pure-Python twins.

Twins: `agent/core/bitmap.py`, `agent/core/nlevents.py`, `agent/firewall/iptables/serialize.py`,
`agent/dns/udpbatch.py` (`_fast/dnsudp.pyx`).

The twins give identical results (the Cython-vs-pure tests in tests/core: test_bitmap,
test_range_allocator, test_serialize, test_nlevents, test_dns_udpbatch); the extension is
optional and `NETAGENT_PURE=1` forces the twins (for tests and benchmarks).
"""

from __future__ import annotations

import os
from types import ModuleType

from agent.core import bitmap as pure_bitmap
from agent.core import nlevents as pure_nlevents
from agent.dns import udpbatch as pure_dnsudp
from agent.firewall.iptables import serialize as pure_serialize


def _load(name: str, fallback: ModuleType) -> tuple[ModuleType, bool]:
    if os.environ.get("NETAGENT_PURE") == "1":
        return fallback, False
    try:
        module = __import__(f"_fast.{name}", fromlist=[name])
    except ImportError:
        return fallback, False
    return module, True


bitmap, _bitmap_fast = _load("bitmap", pure_bitmap)
serialize, _serialize_fast = _load("serialize", pure_serialize)
nlevents, _nlevents_fast = _load("nlevents", pure_nlevents)
dnsudp, _dnsudp_fast = _load("dnsudp", pure_dnsudp)

#: True when every extension is in use.
ACCELERATED = _bitmap_fast and _serialize_fast and _nlevents_fast and _dnsudp_fast

Bitmap = bitmap.Bitmap
#: Per-network address offsets (`AddressAllocator`'s `range_allocator`, `Topology`'s factory).
RangeAllocator = bitmap.RangeAllocator
