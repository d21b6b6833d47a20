"""Real traffic between namespaces: echo servers that answer with the peer's address.

`serve(ns, tcp=[...], udp=[...])` starts one process in `ns` answering every TCP connection
and UDP datagram on those ports with the address it came from (so a test sees NAT at work);
`tcp(ns, ip, port)` / `udp(ns, ip, port)` return that answer, or None when nothing came back.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from tests.e2e.harness import ns_exec

SERVER = r"""
import selectors, socket, sys
tcp = [int(p) for p in sys.argv[1].split(",") if p]
udp = [int(p) for p in sys.argv[2].split(",") if p]
family = socket.AF_INET6 if sys.argv[3] == "6" else socket.AF_INET
any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
sel = selectors.DefaultSelector()
for port in tcp:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((any_addr, port)); s.listen(16); sel.register(s, selectors.EVENT_READ, "tcp")
for port in udp:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((any_addr, port)); sel.register(s, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "tcp":
            c, addr = s.accept()
            with c:
                c.sendall(addr[0].encode())
        else:
            data, addr = s.recvfrom(100)
            s.sendto(addr[0].encode(), addr)
"""

CLIENT = r"""
import socket, sys
proto, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
try:
    if proto == "tcp":
        c = socket.create_connection((ip, port), timeout=1.5)
        print(c.recv(100).decode())
    else:
        c = socket.socket(family, socket.SOCK_DGRAM); c.settimeout(1.0)
        if len(sys.argv) > 4:
            c.bind(("0.0.0.0", int(sys.argv[4])))
        for _ in range(2):
            c.sendto(b"x", (ip, port))
            try:
                print(c.recvfrom(100)[0].decode()); break
            except socket.timeout:
                pass
        else:
            sys.exit(1)
except OSError:
    sys.exit(1)
"""


@contextlib.contextmanager
def serve(ns: str, *, tcp: list[int] = (), udp: list[int] = (), v6: bool = False) -> Iterator:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER]
    argv += [",".join(map(str, tcp)), ",".join(map(str, udp)), "6" if v6 else "4"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _client(ns: str, *args: str) -> str | None:
    r = ns_exec(ns, sys.executable, "-c", CLIENT, *args, check=False, timeout=10)
    return r.stdout.strip() if r.returncode == 0 else None


def tcp(ns: str, ip: str, port: int) -> str | None:
    """The server's view of our address over TCP, or None (refused, dropped, timed out)."""
    return _client(ns, "tcp", ip, str(port))


def udp(ns: str, ip: str, port: int, src_port: int | None = None) -> str | None:
    """The same over UDP (two tries of 1 s); `src_port` pins the client's source port."""
    extra = [str(src_port)] if src_port is not None else []
    return _client(ns, "udp", ip, str(port), *extra)
