"""agentd: process wiring. Owns the root nursery and starts, in order: store, kernel,
adoption, firewall (the backend `--firewall` names), default network, DNS server, reconciler,
API server; each reports started only when consistent.

SIGTERM/SIGINT stop it cleanly: the server stops accepting, the request being applied finishes
(kernel and firewall steps are shielded), the store closes last. Networks, endpoints and rules
stay in place, like Docker's; the next start adopts them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import NoReturn

import trio

from agent import __version__, accel, firewall, lockfile, metrics, preflight
from agent.core import names, naming, plan, pools
from agent.core.errors import AgentError, StorageError
from agent.core.topology import Topology
from agent.dns.server import DnsServer
from agent.dns.upstream import Upstreams
from agent.firewall.base import Firewall
from agent.firewall.monitor import serve_nft_changes
from agent.frontends.docker.handlers import DockerPlugin
from agent.frontends.docker.server import serve_docker_plugin
from agent.frontends.jsonrpc import handlers
from agent.frontends.jsonrpc import protocol as p
from agent.frontends.jsonrpc.limits import Claimed, Limits, SocketInUse, claim_socket
from agent.frontends.jsonrpc.observe import observed
from agent.frontends.jsonrpc.server import InFlight, serve_api
from agent.kernel import base as kernel_base
from agent.kernel import netns
from agent.kernel.client import open_kernel
from agent.kernel.events import serve_link_events
from agent.log import configure, get_logger
from agent.service import Service, rebuild
from agent.service.adopt import adopt
from agent.service.reconcile import Reconciler
from agent.store.sqlite import Store, open_store
from agent.systemd import ActivationError, Notifier, activated_socket

log = get_logger("agent.daemon")

DEFAULT_SOCKET = "/run/netagent/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/netagent"
SHUTDOWN_GRACE = 5.0  # seconds for in-flight answers to be sent after the last change applied
# kernel events buffered for the reconciler (a few hundred bytes each); past it: Overflow,
# then a full resync. Sized for bursts of thousands of attaches at once.
EVENT_QUEUE = 65536
STORE_CHECK_INTERVAL = 1.0  # seconds between checks that the database file is still ours


class Namespaces:
    """`agent.kernel.base.Namespaces` over `agent.kernel.netns`."""

    resolve = staticmethod(netns.resolve)
    create_named = staticmethod(netns.create_named)
    delete_named = staticmethod(netns.delete_named)

    def __init__(self, etc_dir: str = netns.ETC_NETNS) -> None:
        self.etc_dir = etc_dir
        self._own = netns.own_keys()  # agentd's namespace and the host's: never a target

    def netns_key(self, path: str) -> str:
        return netns.target_key(path, self._own)

    def write_resolv_conf(self, name: str, text: str) -> None:
        netns.write_etc(self.etc_dir, name, "resolv.conf", text)

    def remove_resolv_conf(self, name: str) -> None:
        netns.remove_etc(self.etc_dir, name, "resolv.conf")


async def run_daemon(args: argparse.Namespace) -> None:
    """Start everything in order, serve until SIGTERM/SIGINT, then stop in reverse order."""
    started = time.monotonic()
    notifier = Notifier()  # sd_notify; a no-op without NOTIFY_SOCKET
    stats = metrics.Metrics()  # counted always (agentctl info); served with --metrics
    notifier.status("loading state")
    chosen = tuple(pools.parse_pool(x) for x in args.pool) if args.pool else pools.DEFAULT_POOLS
    with (
        open_store(args.state_dir) as store,
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
        state = store.snapshot()  # read at open (the mirror): not decoded twice
        async with (
            open_kernel(args.log_level, args.log_format) as kernel,
            trio.open_nursery() as nursery,
        ):
            # subscribe first, so that nothing that happens during adoption is missed
            link_send, link_events = trio.open_memory_channel[object](EVENT_QUEUE)
            nft_send, nft_events = trio.open_memory_channel[object](EVENT_QUEUE)
            live = args.repair == "live"
            if live:
                # only what may need a repair reaches us (a socket filter), and only our
                # links (link group) are decoded; the rest cost one attribute walk
                await nursery.start(
                    partial(
                        serve_link_events, link_send, group=naming.LINK_GROUP, repairs_only=True
                    )
                )
                await nursery.start(serve_nft_changes, nft_send)
            stats.instrument(kernel, kernel_base.Kernel, stats.kernel_seconds)
            await kernel.set_ip_forward()
            await kernel.reap()  # links a crash left retired (cut off, not yet deleted)
            phases = {"load": time.monotonic() - started}
            notifier.status("adopting the kernel's links")
            topo = Topology(accel.RangeAllocator)
            ns = Namespaces(args.netns_etc_dir)
            owned = await kernel.owned_links()
            phases["dump"] = time.monotonic() - started
            rebuilt = rebuild.needed(store.opened, state, owned)  # the store was lost
            if rebuilt:
                state, _ = rebuild.rebuild(store, owned)
            await adopt(
                state=state, topo=topo, kernel=kernel, owned_links=owned, ns=ns, store=store,
                keep_unknown=rebuilt,
            )  # fmt: skip
            phases["adopt"] = time.monotonic() - started
            fw = firewall.create(args.firewall)
            stats.instrument(fw, Firewall, stats.firewall_seconds)
            svc = Service(
                topo=topo, kernel=kernel, firewall=fw, namespaces=ns, store=store, pools=chosen
            )  # fmt: skip
            stats.tap(svc.bus)
            stats.watch(
                lambda: len(topo.networks), lambda: len(topo.endpoints),
                lambda: svc.reaper.backlog,
            )  # fmt: skip
            await fw.setup(svc.shared.policy())
            await nursery.start(fw.serve)
            phases["firewall"] = time.monotonic() - started
            await nursery.start(svc.reaper.serve)
            nursery.start_soon(_check_store, store)
            if not any(n.is_default for n in topo.networks.values()):
                await svc.networks.create(
                    plan.NetworkSpec(name=naming.DEFAULT_NETWORK, is_default=True)
                )
            upstreams = Upstreams([names.parse_upstream(u) for u in args.dns_upstream])
            dns = DnsServer(topo, upstreams)
            svc.shared.bus.listeners.append(dns.changed)
            await nursery.start(dns.serve)
            reconciler = Reconciler(svc)
            if live:  # else (manual) only `agentctl reconcile` repairs
                await nursery.start(reconciler.serve_link_events, link_events)
                await nursery.start(reconciler.serve_firewall_events, nft_events)
                await nursery.start(reconciler.serve_firewall_repair)
            info = partial(_info, svc, args, started, stats)
            table = observed(handlers.build(svc, reconciler, info), stats.observe_request)
            if args.metrics:
                await nursery.start(metrics.serve_metrics, stats, args.metrics)
            inflight = InFlight()
            limits = Limits(args.max_connections, args.idle_timeout, args.request_timeout or None)
            serve = partial(
                serve_api, table, args.socket, group=args.socket_group, inflight=inflight,
                limits=limits, listener=args.listener, on_connection=stats.connection,
            )  # fmt: skip
            await nursery.start(serve)
            if args.docker_plugin:  # Docker's remote network + IPAM driver protocol
                plugin = DockerPlugin(svc)
                await nursery.start(serve_docker_plugin, plugin.handle, args.docker_plugin)
            # what start-up made lives as long as agentd: frozen, the collector never walks it
            # again, so a full collection stalls the loop (and every DNS answer) ~0.05 ms
            # instead of 11-20 ms (docs/ARCHITECTURE.md, "Names (DNS)")
            gc.freeze()
            log.info(
                "agentd.ready",
                pid=os.getpid(),
                gc_frozen=gc.get_freeze_count(),
                socket=args.socket,
                networks=len(topo.networks),
                endpoints=len(topo.endpoints),
                accelerated=accel.ACCELERATED,
                startup_ms=round((time.monotonic() - started) * 1000, 1),
                phases_ms={k: round(v * 1000, 1) for k, v in phases.items()},  # since start
            )
            # only now can requests succeed: systemd's start job ends here (Type=notify)
            notifier.ready(_status(svc))
            await nursery.start(notifier.serve_watchdog, partial(_status, svc))
            async for signum in signals:
                log.info("agentd.stopping", signal=signal.Signals(signum).name)
                notifier.stopping("stopping: finishing in-flight requests")
                await svc.lock.drain()  # the request being applied finishes; new ones: Busy
                with trio.move_on_after(SHUTDOWN_GRACE):
                    await inflight.wait_idle()  # every answer is sent
                with trio.move_on_after(SHUTDOWN_GRACE):
                    await svc.reaper.wait_idle()  # nothing retired is left undeleted
                nursery.cancel_scope.cancel()
                break
    log.info("agentd.stopped")


async def _check_store(store: Store) -> None:
    """A database deleted or damaged while no request writes is rewritten within a second
    too (each write also checks it, before and after its commit)."""
    while True:
        await trio.sleep(STORE_CHECK_INTERVAL)
        with contextlib.suppress(StorageError):  # logged; every write fails until it works
            store.verify()


def _status(svc: Service) -> str:
    """The one-line STATUS= systemd shows."""
    topo = svc.topo
    return f"serving: {len(topo.networks)} networks, {len(topo.endpoints)} endpoints"


def _info(svc: Service, args: argparse.Namespace, started: float, stats: metrics.Metrics) -> p.Info:
    return p.Info(
        version=__version__,
        pid=os.getpid(),
        socket=args.socket,
        state_dir=args.state_dir,
        networks=len(svc.topo.networks),
        endpoints=len(svc.topo.endpoints),
        accelerated=accel.ACCELERATED,
        firewall=svc.shared.firewall.name,
        uptime_s=round(time.monotonic() - started, 3),
        pending_deletions=svc.reaper.backlog,
        connections=stats.connections,
        requests=stats.requests_total,
        request_errors=stats.request_errors,
        repairs=stats.repairs_total,
        metrics=stats.address,
    )


def _metrics_address(addr: str) -> str:
    try:
        metrics.parse_address(addr)
    except metrics.AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return addr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="agentd", description="netagent daemon")
    ap.add_argument("--socket", default=os.environ.get("NETAGENT_SOCKET", DEFAULT_SOCKET))
    ap.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    ap.add_argument("--socket-group", default=None, help="group allowed to use the socket")
    ap.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="CIDR[:SIZE]",
        help="address pool, e.g. 10.200.0.0/16:24 (repeatable; default: Docker's)",
    )
    ap.add_argument(
        "--firewall", choices=firewall.CHOICES, default=firewall.BACKENDS[0],
        help="firewall backend; auto: nftables where libnftables works (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--repair", choices=("live", "manual"), default="live",
        help="live: repair links and rules as soon as the kernel reports a change (default); "
        "manual: only on `agentctl reconcile`",
    )  # fmt: skip
    ap.add_argument(
        "--docker-plugin", default=None, metavar="PATH",
        help="also serve Docker's network/IPAM plugin protocol on this socket, normally "
        "/run/docker/plugins/netagent.sock (driver name: its basename)",
    )  # fmt: skip
    ap.add_argument(
        "--dns-upstream", action="append", default=[], metavar="IP[:PORT]",
        help="resolver to forward other names to (repeatable; default: /etc/resolv.conf's)",
    )  # fmt: skip
    ap.add_argument(
        "--netns-etc-dir", default=netns.ETC_NETNS, metavar="DIR",
        help="where `run` writes NAME/resolv.conf (default: %(default)s, as `ip netns exec`)",
    )  # fmt: skip
    ap.add_argument(
        "--max-connections", type=_positive(int), default=None, metavar="N",
        help="client connections served at once; more are refused "
        "(default: half the open-files limit, at most 1024)",
    )  # fmt: skip
    ap.add_argument(
        "--idle-timeout", type=_positive(float), default=60.0, metavar="SECONDS",
        help="close a connection that sends nothing for this long (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--request-timeout", type=float, default=30.0, metavar="SECONDS",
        help="a request whose kernel work cannot begin within this long fails with 'busy' "
        "and changes nothing (default: %(default)s; 0: no deadline)",
    )  # fmt: skip
    ap.add_argument(
        "--metrics", default=None, metavar="ADDR", type=_metrics_address,
        help="serve Prometheus metrics at ADDR: HOST:PORT (e.g. 127.0.0.1:9464) or a socket path",
    )  # fmt: skip
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--log-format", choices=("json", "console"), default="json")
    ap.add_argument("--version", action="version", version=f"agentd {__version__}")
    return ap.parse_args(argv)


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


#: errors that say all there is to say: printed as one line, without a traceback
_CLEAR = (
    AgentError,
    preflight.MissingTool,
    lockfile.AlreadyRunning,
    SocketInUse,
    ActivationError,
)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: what actually went wrong."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _fail(exc: BaseException) -> NoReturn:
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    for leaf in leaves:
        if isinstance(leaf, _CLEAR):
            log.error("agentd.failed", error=str(leaf))
        else:
            log.error("agentd.failed", exc_info=leaf)
        print(f"agentd: {leaf}", file=sys.stderr)
    busy = all(isinstance(e, (lockfile.AlreadyRunning, SocketInUse)) for e in leaves)
    sys.exit(lockfile.EXIT_ALREADY_RUNNING if busy else 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure(args.log_level, args.log_format)
    if os.geteuid() != 0:
        print("agentd: must run as root (it creates bridges and firewall rules)", file=sys.stderr)
        sys.exit(1)
    try:  # before anything is touched: one instance per state dir and socket, tools present
        with contextlib.ExitStack() as held:
            held.enter_context(lockfile.hold_state_dir(args.state_dir))
            os.makedirs(os.path.dirname(args.socket) or ".", exist_ok=True)
            activated = activated_socket()  # systemd's socket (agentd.socket): never unlinked
            if activated is not None:
                args.listener = Claimed(activated, activated.getsockname() or args.socket, None)
            else:
                args.listener = claim_socket(args.socket, args.socket_group)
            held.callback(args.listener.release)
            args.firewall = firewall.resolve(args.firewall)
            preflight.check_tools(args.firewall)
            trio.run(run_daemon, args)
    except Exception as exc:
        _fail(exc)


if __name__ == "__main__":
    main()
