"""Firewall policy: what the rules must achieve, as values, whatever the backend (pure).

Theory of operation. The service decides *what* the firewall enforces; a backend
(`agent.firewall`, chosen by `agentd --firewall`) decides *how* (iptables chains, nftables
verdict maps). `build` turns the topology's networks and the endpoints that publish ports into
one `Policy` per address family:

- isolation: traffic between two agent bridges is dropped; a network's own traffic is allowed
  (ICC) or dropped (`icc=False`); an internal network sends nothing off its bridge;
- masquerade: traffic from a network's subnet leaving by another interface is masqueraded
  (unless the network is internal or has `masquerade=False`);
- forwards (published ports): traffic to HOST_IP:HOST_PORT/PROTOCOL on the host is DNATed to
  an endpoint's ADDRESS:PORT, from outside, from the host itself and from the same network
  (hairpin); only DNATed flows are accepted into the bridge.

The IPv6 policy holds the dual-stack networks only, with their IPv6 subnet and the endpoints'
IPv6 addresses. A mapping bound to an IPv4 host address exists for IPv4 only, one bound to an
IPv6 host address for IPv6 only, one without a host address for both. Ports of internal
networks (refused by the service) and of networks not given are left out.

Deterministic: networks sorted by id, each network's forwards by endpoint address then
mapping, so that equal topologies give equal policies and rendering is stable.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Iterable, Mapping

import msgspec

from agent.core import spans
from agent.core.model import Endpoint, Network, PortMapping

FAMILIES = (4, 6)


class NetworkPolicy(msgspec.Struct, frozen=True, gc=False):
    """What the firewall enforces for one network in one family."""

    id: str
    bridge: str
    subnet: str  # canonical CIDR of this family
    internal: bool
    icc: bool
    masquerade: bool


class Forward(msgspec.Struct, frozen=True, gc=False):
    """A published port: HOST_IP:HOST_PORT/PROTOCOL is DNATed to ADDRESS:PORT.

    `host_ip` is "" for every local address of the family.
    """

    protocol: str
    host_port: int
    port: int
    address: str
    host_ip: str = ""


class FamilyPolicy(msgspec.Struct, frozen=True):
    """The policy of one address family (4: iptables/ip, 6: ip6tables/ip6)."""

    family: int
    networks: tuple[NetworkPolicy, ...] = ()
    #: network id -> its forwards, in rendering order (endpoint address, then mapping)
    forwards: Mapping[str, tuple[Forward, ...]] = msgspec.field(default_factory=dict)


class Policy(msgspec.Struct, frozen=True):
    """Both families' policies."""

    v4: FamilyPolicy = msgspec.field(default_factory=lambda: FamilyPolicy(4))
    v6: FamilyPolicy = msgspec.field(default_factory=lambda: FamilyPolicy(6))

    def family(self, family: int) -> FamilyPolicy:
        return self.v4 if family == 4 else self.v6

    @property
    def needs_ipv6(self) -> bool:
        """Whether any network is dual stack (an IPv4-only backend must refuse it)."""
        return bool(self.v6.networks)


EMPTY = Policy()


@functools.lru_cache(maxsize=8192)
def network_policy(
    ident: str, bridge: str, subnet: str, internal: bool, icc: bool, masquerade: bool
) -> NetworkPolicy:
    """One network's policy, memoised: a sync rebuilds every network's, most unchanged."""
    return NetworkPolicy(ident, bridge, subnet, internal, icc, masquerade)


def mapped_for(m: PortMapping, family: int) -> bool:
    """Whether mapping `m` exists in `family` (its host address decides, if it has one)."""
    return not m.host_ip or (":" in m.host_ip) == (family == 6)


def _forwards(endpoints: Iterable[Endpoint], family: int) -> dict[str, tuple[Forward, ...]]:
    found: dict[str, list[tuple[int, tuple[PortMapping, ...], str]]] = {}
    for ep in endpoints:
        ip = ep.ip if family == 4 else ep.ip6
        mappings = tuple(sorted(m for m in ep.ports if mapped_for(m, family)))
        if ip and mappings:
            found.setdefault(ep.network_id, []).append(
                (int(ipaddress.ip_address(ip)), mappings, ip)
            )
    return {
        net: tuple(
            Forward(m.protocol, m.host_port, m.container_port, ip, m.host_ip)
            for _, mappings, ip in sorted(eps, key=lambda e: e[0])
            for m in mappings
        )
        for net, eps in found.items()
    }


#: one network's policies in both families, and the `Network` they were made of
Parts = tuple[Network, NetworkPolicy, NetworkPolicy | None]


def _parts(n: Network) -> Parts:
    v6 = None
    if n.ipv6 and n.subnet6:
        v6 = network_policy(n.id, n.bridge, n.subnet6, n.internal, n.icc, n.masquerade)
    return n, network_policy(n.id, n.bridge, n.subnet, n.internal, n.icc, n.masquerade), v6


def _family(
    nets: tuple[NetworkPolicy, ...], endpoints: list[Endpoint], family: int
) -> FamilyPolicy:
    usable = {n.id for n in nets if not n.internal}
    forwards = {
        k: v for k, v in _forwards(endpoints, family).items() if k in usable
    }  # fmt: skip
    return FamilyPolicy(family, nets, forwards)


def build(networks: Iterable[Network], endpoints: Iterable[Endpoint] = ()) -> Policy:
    """The policy of `networks` and of the ports `endpoints` publish (see the module header).
    `Builder` gives the same policies at a cost that does not grow with the networks."""
    parts = sorted((_parts(n) for n in networks), key=lambda p: p[0].id)
    eps = [e for e in endpoints if e.ports]
    v4 = tuple([p[1] for p in parts])
    v6 = tuple([p[2] for p in parts if p[2] is not None])
    return Policy(_family(v4, eps, 4), _family(v6, eps, 6))


class Builder:
    """`build`, kept from one call to the next: equal results, but a call costs a few list
    comparisons (C loops) plus Python work for the networks that changed only.

    Theory of operation. The list of networks of the last call is kept. A call finds the span
    where the new list differs from it (`spans.changed_span`: a create appends, an rm takes
    one out); only the networks in that span have their `Parts` dropped or made, and are taken
    out of or put into the id-sorted lists each family's tuple is copied from. With 1,000
    networks a create's policy took ~0.2-0.7 ms through `build` (a Python loop, a sort),
    ~0.03 ms here (`bench/bench_dataplane.py --create-only` is where it shows).

    Error handling: a list holding two networks with one id (a caller's bug) is built from
    scratch, as `build` does; the kept state is then rebuilt at the next call.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._given: list[Network] = []  # the networks of the last call, in its order
        self._parts: dict[str, Parts] = {}  # network id -> its parts
        self._ids4: list[str] = []  # network ids, sorted; _v4 aligned with them
        self._v4: list[NetworkPolicy] = []
        self._ids6: list[str] = []  # the dual-stack networks' ids, sorted; _v6 aligned
        self._v6: list[NetworkPolicy] = []

    def build(self, networks: Iterable[Network], endpoints: Iterable[Endpoint] = ()) -> Policy:
        """`build(networks, endpoints)` (see the class docstring)."""
        nets = list(networks)
        old = self._given
        head, tail = spans.changed_span(old, nets)
        for n in old[head : len(old) - tail]:
            self._drop(n)
        for n in nets[head : len(nets) - tail]:
            self._add(n)
        self._given = nets
        if len(self._parts) != len(nets):
            self._reset()  # two networks with one id: start over
            return build(nets, endpoints)
        eps = [e for e in endpoints if e.ports]
        return Policy(self._family(4, eps), self._family(6, eps))

    def _family(self, family: int, eps: list[Endpoint]) -> FamilyPolicy:
        nets = tuple(self._v4 if family == 4 else self._v6)
        if not eps:
            return FamilyPolicy(family, nets, {})
        parts = self._parts
        usable = {  # the networks of this family publishing ports, if not internal
            k: v for k, v in _forwards(eps, family).items()
            if k in parts and not parts[k][0].internal and (family == 4 or parts[k][2] is not None)
        }  # fmt: skip
        return FamilyPolicy(family, nets, usable)

    def _add(self, n: Network) -> None:
        if n.id in self._parts:  # the same id twice in one list: caught by the caller's count
            return
        p = self._parts[n.id] = _parts(n)
        _insert(self._ids4, self._v4, n.id, p[1])
        if p[2] is not None:
            _insert(self._ids6, self._v6, n.id, p[2])

    def _drop(self, n: Network) -> None:
        p = self._parts.pop(n.id, None)
        if p is None:
            return
        _remove(self._ids4, self._v4, n.id)
        if p[2] is not None:
            _remove(self._ids6, self._v6, n.id)


def _insert(ids: list[str], values: list[NetworkPolicy], key: str, value: NetworkPolicy) -> None:
    i = bisect.bisect_left(ids, key)
    ids.insert(i, key)
    values.insert(i, value)


def _remove(ids: list[str], values: list[NetworkPolicy], key: str) -> None:
    i = bisect.bisect_left(ids, key)
    del ids[i]
    del values[i]
