"""Docker with the netagent network driver against Docker's built-in bridge driver, side by side.

Usage: .venv/bin/python bench/bench_docker.py [--rounds N] [--quick] [--json PATH]

Two dockerd 20.10 (/usr/sbin/dockerd, client /usr/bin/docker), each in its own "host"
namespace inside the bench's private one, state on tmpfs (tests/e2e/docker_harness.py):
- netagent: `--bridge=none --iptables=false`, agentd next to it with `--docker-plugin`;
  networks are `docker network create -d netagent`;
- bridge: Docker's defaults (iptables on, userland proxy on); networks `-d bridge`.
Measured, as a user sees it (wall time of the `docker` CLI, which both pay alike), the rounds
of each peer interleaved:
- `docker network create` and `docker network rm` (Docker's IPAM picks the subnet);
- `docker run --rm IMAGE true` on a user network of each driver, without and with
  `-p 8080:80` (Docker starts a docker-proxy per published port for its bridge driver;
  netagent publishes with DNAT rules only).
Targets (issue 15): create+rm >= 3x faster; `run --rm` no slower, faster with `-p`.
`docker version` (a CLI start and one API round trip) is timed too, for scale.
"""

from __future__ import annotations

import time

import _common as c

from tests.e2e.docker_harness import IMAGE, PLUGIN_SOCKET, Dockerd, private_mounts
from tests.e2e.harness import Host

AGENT_POOL = "10.210.0.0/16:24"  # clear of Docker's own default pools


def timed(d: Dockerd, *args: str) -> float:
    """Wall time of one `docker ARGS` (the CLI's start included, as a user waits for it)."""
    t0 = time.perf_counter()
    d.docker(*args)
    return time.perf_counter() - t0


def measure(peers: dict[str, Dockerd], rounds: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {
        p: {"network create": [], "network rm": [], "create+rm": [], "run --rm": [],
            "run --rm -p": [], "docker version": []}
        for p in peers
    }  # fmt: skip
    for peer, d in peers.items():  # a user network of each driver for the runs; warm-up run
        driver = "netagent" if peer == "netagent" else "bridge"
        d.docker("network", "create", "-d", driver, "runs")
        d.docker("run", "--rm", "--network", "runs", IMAGE, "true")
    for i in range(rounds):
        for peer, d in peers.items():
            driver = "netagent" if peer == "netagent" else "bridge"
            name = f"bench{i}"
            create = timed(d, "network", "create", "-d", driver, name)
            remove = timed(d, "network", "rm", name)
            out[peer]["network create"].append(create)
            out[peer]["network rm"].append(remove)
            out[peer]["create+rm"].append(create + remove)
            run = ("run", "--rm", "--network", "runs")
            out[peer]["run --rm"].append(timed(d, *run, IMAGE, "true"))
            out[peer]["run --rm -p"].append(timed(d, *run, "-p", "8080:80", IMAGE, "true"))
            out[peer]["docker version"].append(timed(d, "version"))  # the CLI's own cost
    return out


def main() -> None:
    ap = c.base_parser("docker", __doc__)
    ap.add_argument("--rounds", type=int, default=15, help="rounds of each measure per peer")
    args = ap.parse_args()
    c.isolate()
    rounds = 3 if args.quick else args.rounds
    private_mounts()
    agent_host = Host("--docker-plugin", PLUGIN_SOCKET, "--pool", AGENT_POOL)
    bridge_host = Host()
    peers = {"netagent": Dockerd(agent_host), "bridge": Dockerd(bridge_host, bridge=True)}
    try:
        agent_host.start()
        for d in peers.values():
            d.start()
            d.import_image()
        results = measure(peers, rounds)
    finally:
        for d in peers.values():
            d.stop()
        agent_host.close()
        bridge_host.close()
    summary = {p: {k: c.summarize(v) for k, v in m.items()} for p, m in results.items()}
    rows = []
    for what in summary["netagent"]:
        ours, theirs = summary["netagent"][what]["p50"], summary["bridge"][what]["p50"]
        rows.append((what, ours, theirs, c.ratio(theirs, ours)))
    print(f"\ndocker CLI wall time, p50 of {rounds} rounds (ms); speedup = bridge / netagent")
    print(c.table(["operation", "netagent", "docker bridge", "speedup"], rows))
    c.write_json(args.json, "docker", args, summary)


if __name__ == "__main__":
    main()
