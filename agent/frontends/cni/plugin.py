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
import json
import os
import socket
import sys

DEFAULT_SOCKET = "/run/netagent/agent.sock"
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = VERSIONS[-1]
ENV_NAMES = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
RESULT = b'{"jsonrpc":"2.0","id":1,"result":{"exit":'
ERROR = b'{"id":1,"error":'  # "jsonrpc", a default, is omitted


def _string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _string_end(text: bytes, start: int) -> int | None:
    """The end of the JSON string token opening at `start`, or None."""
    i = start + 1
    while i < len(text):
        if text[i : i + 1] == b"\\":
            i += 2
            continue
        if text[i : i + 1] == b'"':
            return i + 1
        i += 1
    return None


def _fail(version: str, code: int, msg: str, details_json: str | None = None) -> tuple[int, bytes]:
    out = f'{{"cniVersion":{_string(version)},"code":{code},"msg":{_string(msg)}'
    if details_json is not None:
        out += f',"details":{details_json}'
    return 1, (out + "}\n").encode()


def answer(version: str, reply: bytes) -> tuple[int, bytes]:
    """What to print, and the exit status, for agentd's reply line."""
    line = reply.split(b"\n", 1)[0]
    if line.startswith(RESULT) and line.endswith(b"}}"):
        digits, sep, value = line[len(RESULT) : -2].partition(b',"out":')
        if sep and digits.lstrip(b"-").isdigit():
            return int(digits), b"" if value == b"null" else value + b"\n"
    if line.startswith(ERROR):
        details = None
        at = line.find(b'"message":')
        if at >= 0:
            start = at + len(b'"message":')
            end = _string_end(line, start) if line[start : start + 1] == b'"' else None
            if end is not None:
                details = line[start:end].decode(errors="replace")
        if b'"kind":"busy"' in line:
            return _fail(version, 11, "agentd is busy, try again later", details)
        return _fail(version, 999, "agentd refused the request", details)
    return _fail(version, 11, "agentd closed the connection without an answer")


def run(env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    """One plugin call: (exit status, what to print)."""
    try:
        conf = json.loads(stdin)
    except ValueError:
        conf = None
    if not isinstance(conf, dict):
        conf = {}
    version = conf.get("cniVersion")
    version = version if isinstance(version, str) else LATEST
    command = env.get("CNI_COMMAND")
    if command == "VERSION":
        known = version if version in VERSIONS else LATEST
        listed = ",".join(f'"{v}"' for v in VERSIONS)
        return 0, f'{{"cniVersion":"{known}","supportedVersions":[{listed}]}}\n'.encode()
    path = conf.get("socket")
    path = path if isinstance(path, str) and path else DEFAULT_SOCKET
    fields = ",".join(f"{_string(k)}:{_string(env[k])}" for k in ENV_NAMES if k in env)
    request = (
        '{"jsonrpc":"2.0","id":1,"method":"cni.exec","params":{"env":{' + fields + '},"stdin":"'
        + base64.b64encode(stdin).decode() + '"}}\n'
    ).encode()  # fmt: skip
    unreachable = 50 if command == "STATUS" else 11
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        return _fail(version, unreachable, f"agentd is not reachable at {path}",
                     _string(os.strerror(exc.errno or 0)))  # fmt: skip
    with sock:
        try:
            sock.connect(path)
        except OSError as exc:
            details = "socket path too long" if exc.errno is None else os.strerror(exc.errno)
            return _fail(version, unreachable, f"agentd is not reachable at {path}",
                         _string(details))  # fmt: skip
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
    return answer(version, reply)


def main() -> int:
    """The plugin executable: CNI_* from the environment, the configuration on stdin."""
    env = {k: os.environ[k] for k in ENV_NAMES if k in os.environ}
    status, out = run(env, sys.stdin.buffer.read())
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
