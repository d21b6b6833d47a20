"""agentd's DNS server: each DNS-enabled network's names, answered on its gateway, port 53.

Theory of operation.
- Sockets: per network and gateway (IPv4; IPv6 too on a dual-stack network) one UDP and one
  TCP socket bound to GATEWAY:53 with IP_FREEBIND, so the bind holds whether or not the
  address exists: a bridge deleted and recreated (with its address) by the reconciler is
  served again without a rebind. Networks come and go with the
  event bus: `changed` is a synchronous listener of `agent.service.events.EventBus`, so the
  sockets of a new network are bound, and the records of an endpoint are in (or out), before
  the request that made the change is answered.
- Who is answered: only a query whose source address is in the network's own subnet (a
  container of that network, or the host's gateway itself). A container of another network
  sending to this gateway, or anything arriving on another interface (an uplink), gets nothing,
  not even an error: no open resolver, no reflection.
- What is answered: a name of the network's table (`agent.core.names`) authoritatively, every
  other question forwarded upstream (`agent.dns.upstream`); garbage, responses, oversized
  queries are dropped; a malformed but readable query gets FORMERR/NOTIMP (never larger than
  a header and its question, so never an amplification).
- Speed: one thread (`agent.dns.udpthread`) serves every UDP socket: each wake-up serves what
  is waiting, up to `BATCH` datagrams, through `agent.accel.dnsudp` (`_fast/dnsudp.pyx`: one
  recvmmsg, the subnet check on the raw address, cache hits sent with one sendmmsg; its pure
  twin `agent.dns.udpbatch` is the per-datagram loop). The answers to names of the table are
  cached per network by the query's bytes after its id (forgotten when that network's
  records change), so a repeated query costs a dict lookup and no parsing; what the cache
  cannot answer comes back to the Trio loop (`_udp_misses`) and is parsed here. Forwarded
  queries each get a task (at most `MAX_FORWARDS` at once; past that, SERVFAIL at once).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import trio

from agent import accel
from agent.core import names
from agent.core.errors import AgentError
from agent.core.events import Event
from agent.core.topology import Topology
from agent.dns import udpbatch, upstream, wire
from agent.dns.udpthread import UdpThread
from agent.log import get_logger

log = get_logger("agent.dns")

PORT = 53
IP_FREEBIND = 15  # <linux/in.h>; Python's socket module lacks the constant
IPV6_FREEBIND = 78  # <linux/in6.h>
MAX_QUERY = 4096  # octets; a longer "query" is dropped unread
BATCH = 64  # UDP datagrams of one socket served per wake-up before the others
MAX_FORWARDS = 512  # forwarded queries in flight (all networks)
MAX_TCP = 128  # TCP connections open (all networks)
TCP_IDLE = 10.0  # seconds a TCP connection may wait between queries
CACHE_MAX = 4096  # cached answers per network; the cache is emptied when it is full
ROTATIONS = 16  # most round-robin orders prepared for a name with several records


class Listener:
    """One network's sockets on one of its gateways (IPv4, or IPv6 on a dual-stack
    network), and the check of who may ask: an address of that gateway's subnet."""

    def __init__(self, net_id: str, gateway: str, subnet: str) -> None:
        self.net_id = net_id
        self.gateway = gateway
        self.family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
        self.allowed = udpbatch.Subnet(self.family, subnet).allowed  # TCP's check (UDP: batch)
        self.udp = _bind(self.family, gateway, socket.SOCK_DGRAM)
        try:
            self.batch = accel.dnsudp.Batch(self.udp, subnet, BATCH)
            tcp = _bind(self.family, gateway, socket.SOCK_STREAM)
            self.tcp = trio.socket.from_stdlib_socket(tcp)
        except BaseException:
            self.udp.close()
            raise
        self.scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None  # its tasks' (forwards), once it is served
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.scope.cancel()
            self.udp.close()
            self.tcp.close()


def _bind(family: int, gateway: str, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((gateway, PORT))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class DnsServer:
    """The server (see the module docstring). `changed` goes on the event bus's listeners;
    `serve` runs it.

    Resource handling:
        Every socket is closed when `serve` ends (cancelled), and each network's when the
        network is removed.
    """

    def __init__(self, topo: Topology, upstreams: upstream.Upstreams) -> None:
        self.topo = topo
        self.upstreams = upstreams
        self.listeners: dict[tuple[str, str], Listener] = {}  # (network id, gateway) ->
        self._tables: dict[str, names.Table] = {}
        self._unbound: set[str] = set()  # networks with a failed bind, tried at the next change
        # network -> query after its id -> the answers after their id (one per round-robin
        # order of its records; one for most names)
        self._cache: dict[str, dict[bytes, tuple[bytes, ...]]] = {}
        # bound sockets, handed to `serve`'s own task to be served: a task started from
        # `changed` would inherit the context (log fields) of the request that changed things
        self._bound: trio.MemorySendChannel[Listener] | None = None
        self._udp: UdpThread | None = None  # serves every UDP socket's cache hits
        self._forwarding = 0
        self._tcp_open = 0
        self._turn = 0  # round robin: which order of several records goes next

    # -- records ------------------------------------------------------------------------

    def changed(self, event: Event) -> None:
        """An event of the bus: forget the records it may change; bind or close sockets for
        networks that came or went."""
        if event.type == "endpoint":
            try:
                net_id = self.topo.find_network(event.attributes.get("network", "")).id
            except AgentError:  # its network is gone (forced rm): forget everything
                self._forget()
            else:
                self._forget(net_id)
        elif event.type == "network":
            self._forget()
            self.sync(event.id)

    def _forget(self, net_id: str | None = None) -> None:
        if net_id is None:
            self._tables.clear()
            self._cache.clear()
        else:
            self._tables.pop(net_id, None)
            self._cache.pop(net_id, None)

    def table(self, net_id: str) -> names.Table:
        """The network's records (built on first use after a change)."""
        table = self._tables.get(net_id)
        if table is None:
            table = self._tables[net_id] = names.build(self.topo.endpoints_of(net_id))
        return table

    # -- sockets ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every DNS-enabled network's sockets, report started, serve until cancelled."""
        send, receive = trio.open_memory_channel[Listener](float("inf"))
        self._udp = UdpThread(self._cache, self._udp_misses)
        try:
            async with trio.open_nursery() as nursery:
                self._bound = send
                self.sync()
                log.info("dns.ready", networks=len(self.listeners))
                task_status.started()
                async for lst in receive:
                    nursery.start_soon(self._run, lst)
        finally:
            self._bound = None
            for lst in self.listeners.values():
                self._close(lst)
            self.listeners.clear()
            self._udp.close()
            self._udp = None

    def _close(self, lst: Listener) -> None:
        if self._udp is not None:
            self._udp.remove(lst)  # no batch of it in progress from here on
        lst.close()

    def sync(self, changed: str | None = None) -> None:
        """Sockets for exactly the DNS-enabled networks (a failed bind is logged and tried
        again at the next network change). With `changed` (the id of a network created or
        removed), only that network's sockets and the failed ones are looked at: the others
        are as they were, so a network change costs the same with 1,000 networks as with one."""
        if self._bound is None:
            return
        if changed is None:
            nets = list(self.topo.networks.values())
            for key, lst in list(self.listeners.items()):
                if key[0] not in self.topo.networks or not self._wants(key):
                    self._close(lst)
                    del self.listeners[key]
        else:
            nets = [n for i in {changed, *self._unbound} if (n := self.topo.networks.get(i))]
            if changed not in self.topo.networks:  # removed (a create walks no listener)
                for key in [k for k in self.listeners if k[0] == changed]:
                    self._close(self.listeners.pop(key))
        self._unbound.clear()
        for net in nets:
            if not names.dns_enabled(net):
                continue
            wanted = [(net.gateway, net.subnet)]
            if net.gateway6 and net.subnet6:
                wanted.append((net.gateway6, net.subnet6))
            for address, subnet in wanted:
                if (net.id, address) in self.listeners:
                    continue
                try:
                    lst = Listener(net.id, address, subnet)
                except OSError as exc:
                    log.error("dns.bind.failed", network=net.name, address=address, error=str(exc))
                    self._unbound.add(net.id)
                    continue
                self.listeners[net.id, address] = lst
                self._bound.send_nowait(lst)

    def _wants(self, key: tuple[str, str]) -> bool:
        """Whether the listener `key` is one of its (existing) network's DNS addresses."""
        net = self.topo.networks[key[0]]
        six = bool(net.gateway6 and net.subnet6) and key[1] == net.gateway6
        return names.dns_enabled(net) and (key[1] == net.gateway or six)

    async def _run(self, lst: Listener) -> None:
        with lst.scope:
            async with trio.open_nursery() as nursery:
                lst.nursery = nursery
                if self._udp is not None and not lst.closed:
                    self._udp.add(lst)
                nursery.start_soon(self._serve_tcp, lst, nursery)

    # -- UDP ----------------------------------------------------------------------------

    def _udp_misses(self, lst: Listener, misses: list[tuple[bytes, Any]]) -> None:
        """What the UDP thread's batch could not answer from the cache (in the Trio thread):
        parsed, answered (and cached) or forwarded."""
        if lst.closed or lst.nursery is None:
            return
        for data, peer in misses:
            try:
                reply = self._udp_answer(lst, data, peer, lst.nursery)
            except Exception:  # a callback of the run loop must not raise
                log.exception("dns.udp.answer.failed", network=lst.net_id)
                continue
            if reply is not None:
                _send(lst.udp, reply, peer)

    def _udp_answer(
        self, lst: Listener, data: bytes, peer: Any, nursery: trio.Nursery
    ) -> bytes | None:
        """The answer to send now, or None (dropped, or being forwarded); what is answered
        from the table is cached (the caller serves the cache's hits)."""
        if len(data) > MAX_QUERY or not wire.looks_like_query(data):
            return None
        try:
            query = wire.parse(data)
        except wire.WireError:
            return None
        replies = self.answers(lst.net_id, query)
        if replies is None:
            if self._forwarding >= MAX_FORWARDS:
                return wire.error(query, wire.SERVFAIL)
            self._forwarding += 1
            nursery.start_soon(self._forward_udp, lst, data, query, peer)
            return None
        limit = wire.udp_limit(query)
        replies = [r if len(r) <= limit else wire.truncated(query) for r in replies]
        cache = self._cache.get(lst.net_id)
        if cache is None:
            cache = self._cache[lst.net_id] = {}
        elif len(cache) >= CACHE_MAX:
            cache.clear()
        cache[data[2:]] = tuple(r[2:] for r in replies)
        self._turn += 1
        return replies[self._turn % len(replies)]

    def answers(self, net_id: str, query: Any) -> list[bytes] | None:
        """The answers from the network's table, one per round-robin order of its records
        (one when there are fewer than two), or None: forward it."""
        asked = wire.question(query)
        if asked is None:
            rcode = wire.FORMERR if query.header.opcode == wire.QUERY else wire.NOTIMP
            return [wire.error(query, rcode)]
        found = names.lookup(self.table(net_id), *asked)
        if not found.local:
            return None
        turns = max(1, min(len(found.records), ROTATIONS))
        return [wire.answer(query, names.rotated(found, k)) for k in range(turns)]

    def decide(self, net_id: str, query: Any) -> bytes | None:
        """The answer from the network's table (the next round-robin order), or None."""
        replies = self.answers(net_id, query)
        if replies is None:
            return None
        self._turn += 1
        return replies[self._turn % len(replies)]

    async def _forward_udp(self, lst: Listener, data: bytes, query: Any, peer: Any) -> None:
        try:
            response = await upstream.forward(data, self.upstreams.servers(), tcp=False)
        finally:
            self._forwarding -= 1
        if response is None:
            response = wire.error(query, wire.SERVFAIL)
        elif len(response) > wire.udp_limit(query):
            response = wire.truncated(query)
        if not lst.closed:
            _send(lst.udp, response, peer)

    # -- TCP ----------------------------------------------------------------------------

    async def _serve_tcp(self, lst: Listener, nursery: trio.Nursery) -> None:
        listener = trio.SocketListener(lst.tcp)
        while True:
            stream = await listener.accept()
            try:
                peer = stream.socket.getpeername()[0]
            except OSError:
                peer = ""
            if not lst.allowed(peer) or self._tcp_open >= MAX_TCP:
                await stream.aclose()
                continue
            self._tcp_open += 1
            nursery.start_soon(self._serve_connection, lst, stream)

    async def _serve_connection(self, lst: Listener, stream: trio.SocketStream) -> None:
        """Queries on one connection, answered in order, until it closes or idles."""
        try:
            async with stream:
                while True:
                    data = None
                    with trio.move_on_after(TCP_IDLE):
                        data = await _read_message(stream)
                    if not data or not wire.looks_like_query(data):
                        return
                    query = wire.parse(data)
                    reply = self.decide(lst.net_id, query)
                    if reply is None:
                        servers = self.upstreams.servers()
                        reply = await upstream.forward(data, servers, tcp=True)
                        if reply is None:
                            reply = wire.error(query, wire.SERVFAIL)
                    await stream.send_all(struct.pack("!H", len(reply)) + reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.WireError, OSError):
            return
        finally:
            self._tcp_open -= 1


def _send(sock: socket.socket, reply: bytes, peer: Any) -> None:
    # not contextlib.suppress: this is the hot path, and a context manager costs ~0.3 us
    try:  # noqa: SIM105
        sock.sendto(reply, peer)
    except OSError:  # a full buffer, an unreachable peer: UDP is allowed to lose it
        pass


async def _read_message(stream: trio.SocketStream) -> bytes | None:
    """One length-prefixed message (RFC 1035 4.2.2); None at end of stream."""
    head = b""
    while len(head) < 2:
        chunk = await stream.receive_some(2 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = struct.unpack("!H", head)
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
