"""Helpers of the DNS end-to-end tests: queries from inside namespaces (dig, dnspython) and a
fake upstream resolver served in a test namespace (dnspython, independent of agentd's dnslib).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.e2e.harness import ns_exec

#: A fake upstream on 10.99.0.2:53 (UDP and TCP). example.test A 192.0.2.7; big.test: over UDP
#: a truncated answer (TC, no records), over TCP 40 A records; anything else NXDOMAIN. Prints
#: "udp NAME" / "tcp NAME" for each query it gets.
FAKE_UPSTREAM = r"""
import socket, struct, sys, threading
import dns.message, dns.rcode, dns.rrset, dns.flags

def answer(data, tcp):
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    name = q.question[0].name.to_text().lower()
    print(("tcp " if tcp else "udp ") + name, flush=True)
    if name == "example.test.":
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.7"))
    elif name == "big.test.":
        if tcp:
            addrs = [f"192.0.2.{i}" for i in range(1, 41)]
            r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A", addrs))
        else:
            r.flags |= dns.flags.TC
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.99.0.2", 53))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(answer(data, False), peer)

def serve_tcp(c):
    with c:
        while True:
            head = c.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            data = c.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
            out = answer(data, True)
            c.sendall(struct.pack("!H", len(out)) + out)

def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.99.0.2", 53))
    s.listen(16)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_tcp, args=(c,), daemon=True).start()

threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


class FakeUpstream:
    """The fake upstream running in namespace `ns` (10.99.0.2 must be its address)."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", FAKE_UPSTREAM],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def seen(self) -> list[str]:
        """The queries it got so far ("udp NAME." / "tcp NAME.")."""
        self.close()
        assert self.proc.stdout is not None
        return self.proc.stdout.read().splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def dig(ns: str, server: str, *args: str, timeout: float = 1) -> subprocess.CompletedProcess:
    """`dig @server ARGS` in namespace `ns`, one try of `timeout` seconds."""
    return ns_exec(
        ns, "dig", f"@{server}", f"+time={max(1, round(timeout))}", "+tries=1", *args, check=False
    )


def short(ns: str, server: str, *args: str) -> list[str]:
    """The records `dig +short ARGS` prints (sorted; the type is A unless ARGS name one);
    [] for none or no answer."""
    return sorted(dig(ns, server, "+short", *args).stdout.split())


def status(ns: str, server: str, *args: str, timeout: float = 1) -> str | None:
    """The answer's status (NOERROR, NXDOMAIN, SERVFAIL...), or None: no answer at all."""
    out = dig(ns, server, *args, timeout=timeout).stdout
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return None


#: sends each datagram of argv[2:] (hex) to argv[1]:53 from this namespace, then counts the
#: datagrams that come back within a second: prints "replies N bytes M"
SEND_RAW = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
for h in sys.argv[2:]:
    s.sendto(bytes.fromhex(h), (sys.argv[1], 53))
n = total = 0
end = time.monotonic() + 1
while time.monotonic() < end:
    try:
        data = s.recv(65535)
    except socket.timeout:
        continue
    n += 1
    total += len(data)
print("replies", n, "bytes", total)
"""


def send_raw(ns: str, server: str, packets: list[bytes]) -> tuple[int, int]:
    """(replies, bytes replied) to `packets` sent from `ns` to SERVER:53."""
    out = ns_exec(ns, sys.executable, "-c", SEND_RAW, server, *(p.hex() for p in packets))
    words = out.stdout.split()
    return int(words[1]), int(words[3])


def wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


#: from argv[3] sockets at once, sends argv[2] queries for each name of argv[4:] (round the
#: sockets, ids unique) and a garbage datagram after every third, without waiting (fewer than
#: fill the server's receive buffer: ~100 small datagrams take ~100 KiB of its ~208); collects
#: the replies for up to 3 s: prints JSON [[socket, id, name, rcode, [A addresses]], ...]
BURST = r"""
import json, os, socket, sys, time
import dns.message, dns.rdatatype
server, per_name, nsocks, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(nsocks)]
expected = 0
for i in range(per_name):
    for name in names:
        s = socks[expected % nsocks]
        q = dns.message.make_query(name, "A")
        q.id = expected
        s.sendto(q.to_wire(), (server, 53))
        if expected % 3 == 0:  # garbage in between: never answered
            s.sendto(os.urandom(7), (server, 53))
        expected += 1
out = []
end = time.monotonic() + 3
for s in socks:
    s.setblocking(False)
while len(out) < expected and time.monotonic() < end:
    for k, s in enumerate(socks):
        try:
            r = dns.message.from_wire(s.recv(65535))
        except BlockingIOError:
            continue
        addrs = sorted(str(x) for rr in r.answer for x in rr if rr.rdtype == dns.rdatatype.A)
        out.append([k, r.id, r.question[0].name.to_text(), r.rcode(), addrs])
    time.sleep(0.001)
print(json.dumps(out))
"""


def burst(ns: str, server: str, names: list[str], per_name: int, sockets: int) -> list[list]:  # type: ignore[type-arg]
    """The replies to a burst of queries sent from `ns` at once (see `BURST`)."""
    out = ns_exec(ns, sys.executable, "-c", BURST, server, str(per_name), str(sockets), *names)
    return json.loads(out.stdout)  # type: ignore[no-any-return]
