"""Network options: the one table of option names every front end accepts (pure, light).

`agentctl network create --opt KEY=VALUE`, the `options` of JSON-RPC `network.create`, a CNI
conf and Docker's driver options (`docker network create -o`, which reach a plugin in
`com.docker.network.generic`) all name options from `OPTIONS`; Docker's own option names are
aliases of ours, so a stack written for Docker's bridge driver works unchanged. Adding an
option is one row here, plus the `Network` field it sets and what uses it.

Values are strings on every wire (Docker and the CLI send text); `parse` turns them into the
typed `NetworkSpec` fields: booleans accept true/false, 1/0, yes/no in any case, integers are
decimal. Two keys naming the same field must agree.

Import cost matters: agentctl checks `--opt` keys with this module, so it imports only
`agent.core.errors` (no typing, no dataclasses, no msgspec).
"""

from __future__ import annotations

from agent.core.errors import InvalidArgument

TYPE_CHECKING = False
if TYPE_CHECKING:  # `typing` would cost every agentctl run ~4 ms; type checkers see True
    from collections.abc import Mapping
    from typing import Any

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class Option:
    """One row of the table: the short name, the spec field it sets, its type, its aliases."""

    __slots__ = ("aliases", "field", "help", "kind", "name")

    def __init__(
        self, name: str, field: str, kind: type, aliases: tuple[str, ...] = (), help: str = ""
    ) -> None:
        self.name = name
        self.field = field
        self.kind = kind
        self.aliases = aliases
        self.help = help

    def parse(self, key: str, value: str) -> bool | int | str:
        """The typed value of `value`; InvalidArgument naming `key` when it is not one."""
        if self.kind is bool:
            found = _BOOLS.get(value.strip().lower())
            if found is None:
                raise InvalidArgument(
                    f"option {key}: expected true or false, got {value!r}", field=self.field
                )
            return found
        if self.kind is int:
            text = value.strip()
            if not text.isdecimal():
                raise InvalidArgument(
                    f"option {key}: expected an integer, got {value!r}", field=self.field
                )
            return int(text)
        if not value:
            raise InvalidArgument(f"option {key}: empty value", field=self.field)
        return value


OPTIONS: tuple[Option, ...] = (
    Option("bridge", "bridge", str, ("com.docker.network.bridge.name",),
           "name of the bridge device (an existing one is used and kept on rm)"),
    Option("icc", "icc", bool, ("com.docker.network.bridge.enable_icc",),
           "inter-container communication on the network"),
    Option("ip-masquerade", "masquerade", bool,
           ("com.docker.network.bridge.enable_ip_masquerade",),
           "masquerade traffic leaving the network"),
    Option("mtu", "mtu", int, ("com.docker.network.driver.mtu",),
           "MTU of the bridge and the endpoints' interfaces"),
    Option("internal", "internal", bool, ("com.docker.network.internal",),
           "no traffic in or out of the network"),
    Option("ipv6", "ipv6", bool, ("com.docker.network.enable_ipv6",),
           "dual stack: an IPv6 subnet too"),
    Option("dns", "dns", bool, (),
           "endpoints' names answered on the gateway (default: on; off on `bridge`)"),
)  # fmt: skip

#: every accepted key (short names and Docker's) -> its option
BY_KEY: dict[str, Option] = {key: o for o in OPTIONS for key in (o.name, *o.aliases)}


def parse(options: Mapping[str, str]) -> dict[str, Any]:
    """Spec field -> typed value for `options` (keys from `BY_KEY`).

    Raises:
        InvalidArgument: an unknown key, a malformed value, or two keys of one field that
            disagree (`mtu=1400` and `com.docker.network.driver.mtu=1500`).
    """
    fields: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in options.items():
        option = BY_KEY.get(key)
        if option is None:
            known = ", ".join(o.name for o in OPTIONS)
            raise InvalidArgument(f"unknown network option {key!r} (known: {known})", option=key)
        typed = option.parse(key, value)
        if option.field in fields and fields[option.field] != typed:
            raise InvalidArgument(
                f"options {given[option.field]} and {key} disagree", field=option.field
            )
        fields[option.field] = typed
        given[option.field] = key
    return fields
