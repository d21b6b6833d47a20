"""The CNI plugin executable in pure Python: the twin of `_fast/cni/netagent.c`.

Used where no C compiler was available at install (`agentctl cni install` then writes a
launcher of `main`). Same behaviour, same bytes out for the same inputs (the tests run both):
VERSION answered here; anything else forwarded unread to agentd's `cni.exec` as one JSON-RPC
line, agentd's answer printed and its status returned; error 50 (STATUS) or 11 when agentd
cannot be reached. Standard library only (it starts once per call): no msgspec, nothing of
the agent.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import sys

DEFAULT_SOCKET = "/run/netagent/agent.sock"
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = VERSIONS[-1]
ENV_NAMES = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
RESULT = b'{"jsonrpc":"2.0","id":1,"result":{"exit":'
ERROR = b'{"id":1,"error":'  # "jsonrpc", a default, is omitted


_ESCAPES = {b'"': b'\\"', b"\\": b"\\\\", b"\n": b"\\n", b"\r": b"\\r", b"\t": b"\\t",
            b"\b": b"\\b", b"\f": b"\\f"}  # fmt: skip


def _string(value: bytes) -> bytes:
    """`value` as a JSON string, byte for byte as the C client writes it."""
    out = bytearray(b'"')
    for i in range(len(value)):
        c = value[i : i + 1]
        if c in _ESCAPES:
            out += _ESCAPES[c]
        elif c[0] < 0x20:
            out += b"\\u%04x" % c[0]
        else:
            out += c
    return bytes(out + b'"')


# -- the C client's minimal JSON scanner, step for step (not json.loads: the same answers
#    for the same bytes, malformed ones included) ----------------------------------------------

_WS = b" \t\n\r"
_NUMBER = re.compile(rb"[ \t\n\v\f\r]*[+-]?[0-9]+")


def _ws(text: bytes, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: bytes, i: int) -> int | None:
    """The end of the JSON string token opening at `i`, or None."""
    i += 1
    while i < len(text):
        if text[i] == 0x5C:  # backslash
            if i + 1 >= len(text):
                return None
            i += 2
            continue
        if text[i] == 0x22:
            return i + 1
        i += 1
    return None


def _value_end(text: bytes, i: int) -> int | None:
    if i < len(text) and text[i] == 0x22:
        return _string_end(text, i)
    if i < len(text) and text[i] in b"{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == 0x22:
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end - 1
            elif c in b"{[":
                depth += 1
            elif c in b"}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    while i < len(text) and text[i] not in b",}] \t\r\n":
        i += 1
    return i


def _unescape(token: bytes) -> bytes | None:
    out = bytearray()
    i, body = 0, token[1:-1]
    while i < len(body):
        c = body[i : i + 1]
        if c == b"\\":
            i += 1
            e = body[i : i + 1]
            if e == b"n":
                out += b"\n"
            elif e == b"t":
                out += b"\t"
            elif e in (b'"', b"\\", b"/"):
                out += e
            else:
                return None
        else:
            out += c
        i += 1
    return bytes(out)


def top_string(text: bytes, key: bytes) -> bytes | None:
    """The top-level string `key` of the JSON object in `text`, or None."""
    i = _ws(text, 0)
    if i >= len(text) or text[i] != 0x7B:
        return None
    i = _ws(text, i + 1)
    while i < len(text) and text[i] == 0x22:
        k, kend = i, _string_end(text, i)
        if kend is None:
            return None
        i = _ws(text, kend)
        if i >= len(text) or text[i] != 0x3A:
            return None
        i = _ws(text, i + 1)
        v, vend = i, _value_end(text, i)
        if vend is None:
            return None
        if text[v : v + 1] == b'"' and text[k + 1 : kend - 1] == key:
            return _unescape(text[v:vend])
        i = _ws(text, vend)
        if i >= len(text) or text[i] != 0x2C:
            return None
        i = _ws(text, i + 1)
    return None


def _fail(version: bytes, code: int, msg: bytes, details_json: bytes | None = None
          ) -> tuple[int, bytes]:  # fmt: skip
    out = b'{"cniVersion":' + _string(version) + b',"code":%d,"msg":' % code + _string(msg)
    if details_json is not None:
        out += b',"details":' + details_json
    return 1, out + b"}\n"


def answer(version: bytes, reply: bytes) -> tuple[int, bytes]:
    """What to print, and the exit status, for agentd's reply line."""
    line = reply.split(b"\n", 1)[0].split(b"\0", 1)[0]
    if line.startswith(RESULT) and len(line) > len(RESULT):
        number = _NUMBER.match(line, len(RESULT))  # what strtol takes
        if number and line.startswith(b',"out":', number.end()) and line.endswith(b"}}"):
            value = line[number.end() + len(b',"out":') : -2]
            return int(number.group()), b"" if value == b"null" else value + b"\n"
    if line.startswith(ERROR):
        details = None
        at = line.find(b'"message":')
        if at >= 0:
            start = at + len(b'"message":')
            end = _string_end(line, start) if line[start : start + 1] == b'"' else None
            if end is not None:
                details = line[start:end]
        if b'"kind":"busy"' in line:
            return _fail(version, 11, b"agentd is busy, try again later", details)
        return _fail(version, 999, b"agentd refused the request", details)
    return _fail(version, 11, b"agentd closed the connection without an answer")


def run(env: dict[str, bytes], stdin: bytes) -> tuple[int, bytes]:
    """One plugin call: (exit status, what to print)."""
    text = stdin.split(b"\0", 1)[0]  # the C client reads it as a C string
    found = top_string(text, b"cniVersion")
    version = LATEST.encode() if found is None else found
    command = env.get("CNI_COMMAND")
    if command == b"VERSION":
        known = version.decode() if version in {v.encode() for v in VERSIONS} else LATEST
        listed = ",".join(f'"{v}"' for v in VERSIONS)
        return 0, f'{{"cniVersion":"{known}","supportedVersions":[{listed}]}}\n'.encode()
    path = top_string(text, b"socket") or DEFAULT_SOCKET.encode()
    fields = b",".join(_string(k.encode()) + b":" + _string(env[k]) for k in ENV_NAMES if k in env)
    request = (
        b'{"jsonrpc":"2.0","id":1,"method":"cni.exec","params":{"env":{' + fields
        + b'},"stdin":"' + base64.b64encode(stdin) + b'"}}\n'
    )  # fmt: skip
    unreachable = 50 if command == b"STATUS" else 11
    msg = b"agentd is not reachable at " + path
    if len(path) >= 108:  # sizeof(sun_path)
        return _fail(version, unreachable, msg, b'"socket path too long"')
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(path)
            except OSError as exc:
                return _fail(
                    version, unreachable, msg, _string(os.strerror(exc.errno or 0).encode())
                )
            reply = b""
            try:
                sock.sendall(request)
                while b"\n" not in reply:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            except OSError:
                pass
    except OSError as exc:
        return _fail(version, unreachable, msg, _string(os.strerror(exc.errno or 0).encode()))
    return answer(version, reply)


def main() -> int:
    """The plugin executable: CNI_* from the environment, the configuration on stdin."""
    env = {k: os.environb[k.encode()] for k in ENV_NAMES if k.encode() in os.environb}
    status, out = run(env, sys.stdin.buffer.read())
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
