"""Restart: time from agentd start to ready with N networks and M endpoints, and whether traffic
between two existing endpoints is interrupted while agentd is down or adopting.

Usage: .venv/bin/python bench/bench_restart.py [--networks N] [--endpoints M] [--restarts 3]
       [--quick] [--json PATH]

Setup (timed, reported): agentd in its host namespace, N networks, M endpoints on a /16 network,
and two more endpoints A and B on network `s0`. Then, `--restarts` times: `ping -i 0.01` from A
to B starts, 0.5 s later agentd gets SIGTERM; once it has exited a new agentd starts on the same
state; "ready" is the first `system.info` answer (polled every 2 ms); 0.5 s later ping stops.
Reported per restart: stop time (SIGTERM to exit), start-to-ready, SIGTERM-to-ready, replies lost
(transmitted - received), and whether the networks/endpoints counts survived. The targets are
N=1,000 and M=10,000; the defaults are smaller so the run fits in about 2 minutes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
from bench_scale import fill_endpoints, fill_networks

PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")


def start_ping(src: str, dst_ip: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{src}", "ping", "-i", "0.01", "-W", "1", "-q", dst_ip],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_ping(proc: subprocess.Popen[str]) -> tuple[int, int]:
    """SIGINT ping; (transmitted, received) from its summary."""
    proc.send_signal(2)
    out, _ = proc.communicate(timeout=10)
    m = PING_RE.search(out)
    if m is None:
        raise RuntimeError(f"unexpected ping output: {out[-300:]!r}")
    return int(m.group(1)), int(m.group(2))


def counts(agentd: c.Agentd) -> tuple[int, int]:
    info = agentd.client().call("system.info")
    return info["networks"], info["endpoints"]


def one_restart(agentd: c.Agentd, dst_ip: str, margin: float) -> dict[str, Any]:
    before = counts(agentd)
    ping = start_ping("ping-a", dst_ip)
    time.sleep(margin)
    t0 = time.perf_counter()
    stop_s = agentd.stop()
    ready_s = agentd.start()
    down_s = time.perf_counter() - t0
    time.sleep(margin)
    sent, received = stop_ping(ping)
    after = counts(agentd)
    ready = [json.loads(line) for line in agentd.log().splitlines() if '"agentd.ready"' in line]
    print(
        f"  agentd: startup {ready[-1].get('startup_ms')} ms, phases (ms since start) "
        f"{ready[-1].get('phases_ms')}",
        flush=True,
    )
    return {
        "agentd_phases_ms": ready[-1].get("phases_ms"),
        "stop_s": round(stop_s, 3),
        "start_to_ready_s": round(ready_s, 3),
        "sigterm_to_ready_s": round(down_s, 3),
        "pings_sent": sent,
        "pings_lost": sent - received,
        "state_kept": before == after,
        "networks": after[0],
        "endpoints": after[1],
    }


def setup(agentd: c.Agentd, args: Any) -> tuple[dict[str, Any], str]:
    """Build the state; returns setup timings and B's address."""
    client = agentd.client()
    t0 = time.perf_counter()
    fill_networks(client, 0, max(1, args.networks))
    out: dict[str, Any] = {"networks_setup_s": round(time.perf_counter() - t0, 2)}
    if args.endpoints:
        spread = [f"s{k}" for k in range(max(1, args.networks))]  # 10 each at 1,000 / 10,000
        out["endpoints"] = fill_endpoints(agentd, args.endpoints, spread)
    c.add_netns(["ping-a", "ping-b"])
    client.call("endpoint.connect", c.connect_params("s0", "/run/netns/ping-a"))
    ep = client.call("endpoint.connect", c.connect_params("s0", "/run/netns/ping-b"))
    sent, received = stop_ping_after(start_ping("ping-a", ep["ip"]), 0.3)
    if received == 0:
        raise RuntimeError(f"no traffic between the two endpoints before the restart ({sent})")
    out["rss_mb"] = round(agentd.rss_mb(), 1)
    return out, ep["ip"]


def stop_ping_after(proc: subprocess.Popen[str], seconds: float) -> tuple[int, int]:
    time.sleep(seconds)
    return stop_ping(proc)


def main() -> None:
    c.isolate()
    ap = c.base_parser("restart", __doc__)
    ap.add_argument("--networks", type=int, default=300)
    ap.add_argument("--endpoints", type=int, default=3000)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.5, help="ping seconds before and after")
    args = ap.parse_args()
    if args.quick:
        args.networks, args.endpoints, args.restarts = (
            min(args.networks, 20),
            min(args.endpoints, 100),
            1,
        )
    workdir = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    agentd = c.Agentd("h-restart", "--pool", "10.0.0.0/8:24", workdir=workdir)
    try:
        first_ready = agentd.start()
        state, dst_ip = setup(agentd, args)
        state["first_start_to_ready_s"] = round(first_ready, 3)
        runs = [one_restart(agentd, dst_ip, args.margin) for _ in range(args.restarts)]
    finally:
        agentd.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.networks} networks (+ default), {args.endpoints} endpoints (+2 pinging); "
        f"setup: networks {state['networks_setup_s']} s, endpoints "
        f"{state.get('endpoints', {}).get('connect_setup_s', 0)} s; RSS {state['rss_mb']} MiB"
    )
    print(
        c.table(
            [
                "restart",
                "stop s",
                "start->ready s",
                "SIGTERM->ready s",
                "pings sent",
                "pings lost",
                "state kept",
            ],
            [
                [
                    i + 1,
                    r["stop_s"],
                    r["start_to_ready_s"],
                    r["sigterm_to_ready_s"],
                    r["pings_sent"],
                    r["pings_lost"],
                    r["state_kept"],
                ]
                for i, r in enumerate(runs)
            ],
        )
    )
    if args.networks < 1000 or args.endpoints < 10000:
        print(
            "note: targets are stated for 1,000 networks / 10,000 endpoints; "
            "pass --networks 1000 --endpoints 10000 (takes longer)"
        )
    c.write_json(args.json, "restart", args, {"setup": state, "restarts": runs})


if __name__ == "__main__":
    main()
