import subprocess, sys, time
import _common as c
from bench_dataplane import Bed
from agent.frontends.jsonrpc import protocol as p
c.isolate()
with Bed("nftables") as bed:
    bed.fill(999)
    spy = subprocess.Popen(["/work/main/.venv/bin/py-spy", "record", "-r", "400", "-s", "--format", "raw",
                            "-o", "/tmp/create-prof.txt", "-p", str(bed.agentd.pid), "-d", "12"])
    time.sleep(1)
    t_end = time.time() + 10
    while time.time() < t_end:
        bed.client.call("network.create", p.NetworkCreate(name="cr"))
        bed.client.call("network.remove", p.NetworkRemove(network="cr"))
        time.sleep(0.05)
    spy.wait()
