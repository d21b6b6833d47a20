"""The CNI protocol at agentd's edge: a plugin call read into values, results and errors built
(pure: no I/O).

Theory of operation. A runtime runs the plugin executable with `CNI_*` variables and the
plugin's configuration on stdin (CNI spec 1.1.0, `SPEC.md` of containernetworking/cni). The
thin client (`_fast/cni/netagent.c`, or its twin `agent.frontends.cni.plugin`) forwards both,
unread, to agentd's `cni.exec`; this module turns them into a `Call` (or raises `CniError`
with the spec's code), and turns what the service did into the spec's result or error JSON,
in the configuration's version. `agent.frontends.cni.commands` runs the call.

Checks, in the order a runtime would hit them: stdin must be a JSON object (6), its
`cniVersion` one we speak (1), `CNI_COMMAND` known (4) and allowed in that version (CHECK
from 0.4.0, STATUS and GC from 1.1.0: 1), the command's variables present and well formed
(4), then the configuration's fields (7).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import msgspec

from agent.core import names, naming, ports
from agent.core.errors import AgentError
from agent.core.model import Endpoint, Network, PortMapping

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
#: the variables each command needs (CNI_COMMAND aside)
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
    "VERSION": (),
}
#: the first version that has each command
SINCE = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}

# the spec's well-known error codes, and ours (100 and up are a plugin's own)
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
UNAVAILABLE = 50  # STATUS: the plugin cannot serve ADDs
CONFLICT = 100  # an address, port or attachment already taken
POOL_EXHAUSTED = 101
KERNEL = 102
FIREWALL = 103
CHECK_FAILED = 104  # CHECK: the attachment is not as its result says
INTERNAL = 999

#: an `AgentError.kind` raised by the service -> our code
CODE_OF_KIND = {
    "invalid_argument": INVALID_CONFIG,
    "not_found": UNKNOWN_CONTAINER,  # the network is checked first: what is left is the netns
    "busy": TRY_AGAIN,
    "conflict": CONFLICT,
    "pool_exhausted": POOL_EXHAUSTED,
    "kernel": KERNEL,
    "firewall": FIREWALL,
}

# the spec: "alphanumeric, plus underscore, period and hyphen", starting alphanumeric
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    @classmethod
    def of(cls, exc: AgentError) -> CniError:
        """The CNI error of a service error."""
        return cls(CODE_OF_KIND.get(exc.kind, INTERNAL), exc.message, exc.kind)


class PortMap(msgspec.Struct, frozen=True, rename="camel"):
    """One `runtimeConfig.portMappings` entry (the `portMappings` capability)."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = msgspec.field(default="", name="hostIP")


class RuntimeConfig(msgspec.Struct, frozen=True, rename="camel"):
    port_mappings: list[PortMap] = msgspec.field(default_factory=list)
    ips: list[str] = msgspec.field(default_factory=list)
    mac: str | None = None


class Attachment(msgspec.Struct, frozen=True, rename="camel"):
    """One entry of GC's `cni.dev/valid-attachments`."""

    container_id: str = msgspec.field(name="containerID")
    ifname: str


class Conf(msgspec.Struct, frozen=True, rename="camel"):
    """The plugin's configuration as the runtime passes it (unknown fields are ignored)."""

    cni_version: str
    name: str = ""
    type: str = "netagent"
    network: str = ""  # the agent network (default: `name`)
    socket: str = ""  # read by the client only
    subnet: str | None = None  # create the network on first use (a node's pod CIDR)
    gateway: str | None = None
    ipv6: bool = False
    subnet6: str | None = None
    internal: bool = False
    mtu: int | None = None
    runtime_config: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    prev_result: dict[str, Any] | None = None
    valid_attachments: list[Attachment] | None = msgspec.field(
        default=None, name="cni.dev/valid-attachments"
    )

    @property
    def network_name(self) -> str:
        return self.network or self.name


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One plugin call, checked."""

    command: str
    version: str
    conf: Conf
    container_id: str = ""
    netns: str = ""
    ifname: str = ""

    @property
    def attachment(self) -> str:
        """The endpoint's key: (CNI_CONTAINERID, CNI_IFNAME)."""
        return f"{self.container_id}/{self.ifname}"


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def version_of(stdin: bytes) -> str:
    """The version errors are written in: the configuration's if it names a string, else
    `LATEST` (what the clients do too)."""
    try:
        doc = msgspec.json.decode(stdin)
    except msgspec.DecodeError:
        return LATEST
    found = doc.get("cniVersion") if isinstance(doc, dict) else None
    return found if isinstance(found, str) else LATEST


def parse(env: dict[str, str], stdin: bytes) -> Call:
    """Read one call (see the module docstring for the order of the checks).

    Raises:
        CniError: with the spec's code.
    """
    try:
        doc = msgspec.json.decode(stdin)
    except msgspec.DecodeError as exc:
        raise CniError(DECODING_FAILURE, "the configuration is not JSON", str(exc)) from exc
    if not isinstance(doc, dict):
        raise CniError(DECODING_FAILURE, "the configuration is not a JSON object")
    version = doc.get("cniVersion")
    if version not in VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {list(VERSIONS)}",
        )
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}", f"one of {COMMANDS}")
    if (since := SINCE.get(command)) and _vkey(version) < _vkey(since):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {command}",
            f"{command} needs {since} or later",
        )
    missing = [var for var in REQUIRED_ENV[command] if not env.get(var)]
    if missing:
        raise CniError(INVALID_ENV, f"required environment variables missing: {missing}")
    try:
        conf = msgspec.convert(doc, Conf)
    except msgspec.ValidationError as exc:
        raise CniError(INVALID_CONFIG, "invalid network configuration", str(exc)) from exc
    if not conf.network_name:
        raise CniError(INVALID_CONFIG, "the configuration names no network (name or network)")
    call = Call(
        command=command,
        version=version,
        conf=conf,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
    )
    _check_env(call)
    return call


def _check_env(call: Call) -> None:
    if call.container_id and not _CONTAINER_ID.fullmatch(call.container_id):
        raise CniError(
            INVALID_ENV,
            f"invalid CNI_CONTAINERID {call.container_id!r}",
            "alphanumeric, underscore, period and hyphen, starting alphanumeric",
        )
    if call.ifname:
        try:
            naming.validate_ifname(call.ifname)
        except AgentError as exc:
            raise CniError(INVALID_ENV, f"invalid CNI_IFNAME: {exc.message}") from exc
    if call.netns and not call.netns.startswith("/"):
        raise CniError(INVALID_ENV, f"CNI_NETNS must be an absolute path, not {call.netns!r}")


# -- runtimeConfig -> endpoint request -------------------------------------------------------


def port_mappings(conf: Conf) -> tuple[PortMapping, ...]:
    """`runtimeConfig.portMappings` as the core's mappings (checked by `agent.core.ports`).

    Raises:
        CniError: INVALID_CONFIG for a malformed mapping.
    """
    specs = []
    for pm in conf.runtime_config.port_mappings:
        host = pm.host_ip
        if host in ("0.0.0.0", "::"):
            host = ""
        elif ":" in host:
            host = f"[{host}]"
        prefix = f"{host}:" if host else ""
        specs.append(f"{prefix}{pm.host_port}:{pm.container_port}/{pm.protocol.lower()}")
    try:
        return tuple(ports.parse_all(specs))
    except AgentError as exc:
        raise CniError(INVALID_CONFIG, f"runtimeConfig.portMappings: {exc.message}") from exc


def static_ips(conf: Conf) -> tuple[str | None, str | None]:
    """`runtimeConfig.ips` (addresses, with or without a prefix) as (IPv4, IPv6).

    Raises:
        CniError: INVALID_CONFIG for a malformed address or two of one family.
    """
    found: dict[int, str] = {}
    for text in conf.runtime_config.ips:
        try:
            ip = ipaddress.ip_interface(text).ip
        except ValueError as exc:
            raise CniError(INVALID_CONFIG, f"runtimeConfig.ips: invalid address {text!r}") from exc
        if ip.version in found:
            raise CniError(INVALID_CONFIG, f"runtimeConfig.ips: two IPv{ip.version} addresses")
        found[ip.version] = str(ip)
    return found.get(4), found.get(6)


# -- results ---------------------------------------------------------------------------------


def add_result(call: Call, net: Network, ep: Endpoint) -> dict[str, Any]:
    """The ADD result in the call's version: the host veth and the sandbox interface (index
    1, which every address names), addresses in CIDR form with the gateway, the default
    routes the endpoint holds, `dns` naming the gateway when the network answers names; after
    a prevResult's own (netagent chained after another plugin), their indexes moved past its
    interfaces."""
    legacy = _vkey(call.version) < (1, 0, 0)  # 0.3.x and 0.4.0 tag each address's family
    ips: list[dict[str, Any]] = []
    routes: list[dict[str, str]] = []
    prefix = net.subnet.split("/")[1]
    ips.append({"address": f"{ep.ip}/{prefix}", "gateway": net.gateway, "interface": 1})
    if ep.default_route:
        routes.append({"dst": "0.0.0.0/0", "gw": net.gateway})
    if ep.ip6 is not None and net.subnet6 is not None and net.gateway6 is not None:
        prefix6 = net.subnet6.split("/")[1]
        ips.append({"address": f"{ep.ip6}/{prefix6}", "gateway": net.gateway6, "interface": 1})
        if ep.default_route:
            routes.append({"dst": "::/0", "gw": net.gateway6})
    if legacy:
        ips = [{"version": "6" if ":" in ip["address"] else "4", **ip} for ip in ips]
    interfaces: list[dict[str, Any]] = [
        {"name": ep.host_ifname},
        {"name": ep.ifname, "mac": ep.mac, "sandbox": call.netns},
    ]
    prev = call.conf.prev_result
    if prev:  # chained after another plugin: its result first, ours appended (indexes moved)
        before = list(prev.get("interfaces") or [])
        for ip in ips:
            ip["interface"] += len(before)
        interfaces = before + interfaces
        ips = list(prev.get("ips") or []) + ips
        routes = list(prev.get("routes") or []) + routes
    return {
        "cniVersion": call.version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": (prev or {}).get("dns") or _dns(net),
    }


def _dns(net: Network) -> dict[str, Any]:
    """The network's embedded DNS server (its gateways), when it has names."""
    if not names.dns_enabled(net):
        return {}
    servers = [net.gateway] + ([net.gateway6] if net.gateway6 else [])
    return {"nameservers": servers}


def prev_addresses(call: Call) -> set[str]:
    """CHECK: the addresses `prevResult` gives our sandbox interface (CNI_IFNAME in
    CNI_NETNS), in CIDR form.

    Raises:
        CniError: INVALID_CONFIG without a usable prevResult, CHECK_FAILED when it names no
            such interface.
    """
    prev = call.conf.prev_result
    if prev is None:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult")
    try:
        ifaces = prev.get("interfaces") or []
        wanted = {
            i for i, it in enumerate(ifaces)
            if it.get("name") == call.ifname and it.get("sandbox") == call.netns
        }  # fmt: skip
        if not wanted:
            raise CniError(
                CHECK_FAILED, f"prevResult has no interface {call.ifname} in {call.netns}"
            )
        return {
            str(ipaddress.ip_interface(ip["address"]))
            for ip in prev.get("ips") or []
            if ip.get("interface") in wanted
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CniError(INVALID_CONFIG, "malformed prevResult", repr(exc)) from exc


def error_doc(version: str, exc: CniError) -> dict[str, Any]:
    """The spec's error object."""
    doc: dict[str, Any] = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        doc["details"] = exc.details
    return doc


def version_doc(version: str) -> dict[str, Any]:
    """VERSION's answer (also what the clients print without asking agentd)."""
    return {"cniVersion": version, "supportedVersions": list(VERSIONS)}
