"""Prometheus metrics of agentd (`agentd --metrics ADDR`).

Theory of operation. `Metrics` holds prometheus-client metrics in a registry of its own (not
the library's global one). Nothing in the service or the shells knows it exists: the daemon
attaches it at wiring time, at one place per kind of work:
- requests: `observe_request`, called by `agent.frontends.jsonrpc.observe` around each
  handler (method, outcome = "ok", the error's kind, or "internal"); connections:
  `connection` from the API server;
- kernel and firewall: `instrument` wraps, on the one object agentd uses, every coroutine
  method its protocol (`agent.kernel.base.Kernel`, `agent.firewall.base.Firewall`) declares,
  so each kernel job and each firewall transaction is timed, whatever the backend;
- repairs: `tap` wraps the event bus's `publish`: a `repair` event (its `object`: network,
  endpoint, firewall) or a vanished endpoint's release is counted by kind, synchronously (a bus
  subscriber could be dropped when slow, and would miss counts);
- networks, endpoints, pending deletions: read from the topology at scrape time (`watch`).
`serve_metrics` answers `GET /metrics` with `generate_latest` on a TCP address or a Unix
socket, from the Trio loop, through h11 (one small request at a time per connection).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import socket as stdsocket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import prometheus_client as prom
import trio

from agent.log import get_logger

log = get_logger("agent.metrics")

# request and kernel latencies: sub-millisecond reads to multi-second batches
# (few: each bucket is a line of every series in every scrape, ~30 us each to render)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0)
IDLE_TIMEOUT = 10.0  # seconds a scrape connection may stay silent
MAX_SCRAPERS = 16  # concurrent scrape connections; more are closed at once
MAX_REQUEST = 16384  # bytes of request head (h11's limit)


class Metrics:
    """agentd's metrics and the counters `agentctl info` shows (see the module docstring)."""

    def __init__(self) -> None:
        # no `_created` series: a restart shows in process_start_time_seconds already, and
        # they would double the text of every scrape (process-wide; agentd has one registry)
        prom.disable_created_metrics()  # type: ignore[no-untyped-call]
        reg = self.registry = prom.CollectorRegistry()
        self.request_seconds = prom.Histogram(
            "netagent_request_duration_seconds",
            "API requests by method and outcome (ok, an error kind, internal); _count counts them",
            ["method", "outcome"], buckets=BUCKETS, registry=reg,
        )  # fmt: skip
        self.kernel_seconds = prom.Histogram(
            "netagent_kernel_call_duration_seconds",
            "kernel worker jobs (netlink transactions) by call and outcome",
            ["call", "outcome"], buckets=BUCKETS, registry=reg,
        )  # fmt: skip
        self.firewall_seconds = prom.Histogram(
            "netagent_firewall_transaction_duration_seconds",
            "firewall transactions (setup, apply, repair) by call and outcome",
            ["call", "outcome"], buckets=BUCKETS, registry=reg,
        )  # fmt: skip
        self.repairs = prom.Counter(
            "netagent_repairs", "repairs made by the reconciler, by kind", ["kind"], registry=reg
        )
        self.connections_open = prom.Gauge(
            "netagent_api_connections", "open API connections", registry=reg
        )
        self.connections_accepted = prom.Counter(
            "netagent_api_connections_accepted", "API connections accepted", registry=reg
        )
        self.networks = prom.Gauge("netagent_networks", "networks", registry=reg)
        self.endpoints = prom.Gauge("netagent_endpoints", "endpoints", registry=reg)
        self.pending_deletions = prom.Gauge(
            "netagent_pending_deletions",
            "retired links the reaper has not deleted yet",
            registry=reg,
        )
        # process_start_time_seconds: a restart (after a crash, or systemd's watchdog) shows
        # as a change of it, as for any Prometheus target
        prom.ProcessCollector(registry=reg)
        # headline figures for `agentctl info` (plain ints: no label lookups to read them)
        self.requests_total = 0
        self.request_errors = 0
        self.repairs_total = 0
        self.connections = 0
        self.address = ""

    # -- hooks -------------------------------------------------------------------------------

    def observe_request(self, method: str, outcome: str, seconds: float) -> None:
        self.request_seconds.labels(method, outcome).observe(seconds)
        self.requests_total += 1
        if outcome != "ok":
            self.request_errors += 1

    def connection(self, delta: int) -> None:
        """An API connection opened (+1) or closed (-1)."""
        self.connections += delta
        self.connections_open.inc(delta)
        if delta > 0:
            self.connections_accepted.inc()

    def repaired(self, kind: str) -> None:
        self.repairs.labels(kind).inc()
        self.repairs_total += 1

    def watch(
        self, networks: Callable[[], int], endpoints: Callable[[], int], pending: Callable[[], int]
    ) -> None:
        """Gauges read at scrape time."""
        self.networks.set_function(networks)
        self.endpoints.set_function(endpoints)
        self.pending_deletions.set_function(pending)

    def instrument(self, obj: object, protocol: type, histogram: prom.Histogram) -> None:
        """Time every coroutine method `protocol` declares, on `obj` (an instance attribute
        that shadows the class's method: callers see no difference). `serve*` methods run
        until cancelled: they are not calls to time."""
        for name, member in vars(protocol).items():
            if name.startswith(("_", "serve")):
                continue
            if inspect.iscoroutinefunction(member):
                setattr(obj, name, _timed(getattr(obj, name), histogram, name))

    def tap(self, bus: Any) -> None:
        """Count repairs as the event bus publishes them (see the module docstring)."""
        publish = bus.publish

        @functools.wraps(publish)
        def counted(type: str, action: str, id: str, **attributes: object) -> Any:
            if type == "repair":
                self.repaired(str(attributes.get("object", "other")))
            elif type == "endpoint" and action == "released":
                self.repaired("endpoint_vanished")
            return publish(type, action, id, **attributes)

        bus.publish = counted

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)


def _timed(
    call: Callable[..., Awaitable[Any]], histogram: prom.Histogram, name: str
) -> Callable[..., Awaitable[Any]]:
    # the "ok" child is looked up once, at the first call (a call never made adds no series
    # to the scrape); an error is rare enough to pay the label lookup
    ok: list[Any] = []

    @functools.wraps(call)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = await call(*args, **kwargs)
        except BaseException:
            histogram.labels(name, "error").observe(time.perf_counter() - start)
            raise
        if not ok:
            ok.append(histogram.labels(name, "ok"))
        ok[0].observe(time.perf_counter() - start)
        return result

    return timed


# -- the HTTP endpoint ------------------------------------------------------------------------


class AddressError(ValueError):
    """A `--metrics` address that is neither HOST:PORT nor a Unix socket path."""


def parse_address(addr: str) -> tuple[str, int] | str:
    """`HOST:PORT` (`[::1]:9464` for IPv6) -> (host, port); a path (it has a `/`) -> itself.

    Error handling:
        AddressError with what was expected.
    """
    if "/" in addr:
        return addr
    host, sep, port = addr.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(
            f"--metrics {addr!r}: expected HOST:PORT (e.g. 127.0.0.1:9464) or a socket path"
        )
    return host, int(port)


async def serve_metrics(
    metrics: Metrics, addr: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer `GET /metrics` on `addr` until cancelled.

    Resource handling:
        A Unix socket file is replaced if stale and removed on exit.
    """
    where = parse_address(addr)
    listeners: list[trio.SocketListener]
    if isinstance(where, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        await sock.bind(where)
        sock.listen(64)
        listeners = [trio.SocketListener(sock)]
    else:
        listeners = await trio.open_tcp_listeners(where[1], host=where[0])
    metrics.address = addr
    limit = trio.CapacityLimiter(MAX_SCRAPERS)

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            with trio.move_on_after(IDLE_TIMEOUT * 3):  # a whole connection, bounded too
                await _serve_http(stream, metrics)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            limit.release()
            with contextlib.suppress(Exception):
                await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            log.info("metrics.listening", address=addr)
            task_status.started()
    finally:
        if isinstance(where, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)


async def _serve_http(stream: trio.abc.Stream, metrics: Metrics) -> None:
    """HTTP/1.1 with keep-alive: each request answered in turn until the client closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    while True:
        try:
            event = await _next_event(stream, conn)
        except h11.RemoteProtocolError as exc:  # not HTTP, or too long: 400 if we still can
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = b"bad request\n"
                head = [("content-type", "text/plain"), ("content-length", str(len(body)))]
                response = h11.Response(status_code=exc.error_status_hint, headers=head)
                await stream.send_all(
                    conn.send(response) + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage())
                )  # fmt: skip
            return
        if isinstance(event, h11.ConnectionClosed) or event is None:
            return
        if isinstance(event, h11.Request):
            await _respond(stream, conn, event, metrics)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = b""
        with trio.move_on_after(IDLE_TIMEOUT):
            data = bytes(await stream.receive_some(65536))
            conn.receive_data(data)
            continue
        return None  # idle: close


async def _respond(
    stream: trio.abc.Stream, conn: h11.Connection, req: h11.Request, metrics: Metrics
) -> None:
    path = req.target.split(b"?", 1)[0]
    if req.method not in (b"GET", b"HEAD"):
        status, reason, body, ctype = 405, b"Method Not Allowed", b"only GET\n", "text/plain"
    elif path in (b"/metrics", b"/"):
        status, reason, body, ctype = 200, b"OK", metrics.text(), prom.CONTENT_TYPE_LATEST
    else:
        status, reason, body, ctype = 404, b"Not Found", b"see /metrics\n", "text/plain"
    headers = [("content-type", ctype), ("content-length", str(len(body)))]
    if status == 405:
        headers.append(("allow", "GET, HEAD"))
    response = h11.Response(status_code=status, reason=reason, headers=headers)
    data = conn.send(response) or b""
    if req.method != b"HEAD":
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    # drain the request's body, if any, so the next cycle can start
    while conn.their_state is h11.SEND_BODY:
        if await _next_event(stream, conn) is None:
            return
