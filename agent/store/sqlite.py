"""Desired state in sqlite3 (WAL): networks, endpoints, sandboxes and allocator cursors.

Theory of operation: the store holds what the agent *wants*; the kernel is observed state.
Each mutation is one transaction committed before the request is answered, so after a
`kill -9` a restart sees every change a client was told about. `synchronous=NORMAL` in WAL mode
survives a process crash (the WAL is in the page cache); only a power loss could drop the last
transactions, which the restart's adoption then repairs from the kernel's view.

Calls are synchronous and short (tens of microseconds): the service calls them from the Trio
thread between kernel steps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from agent.core.model import Endpoint, Network, Sandbox

#: Schema version (PRAGMA user_version). 1: endpoints may be reserved (netns_key ""), so the
#: one-endpoint-per-namespace-and-network rule holds for joined endpoints only.
SCHEMA_VERSION = 1
_ENDPOINTS = (
    "CREATE TABLE IF NOT EXISTS endpoints (id TEXT PRIMARY KEY, network_id TEXT NOT NULL, "
    "netns_key TEXT NOT NULL, body BLOB NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS endpoints_joined ON endpoints (network_id, netns_key) "
    "WHERE netns_key != ''",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS networks (
    id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, body BLOB NOT NULL);
{";".join(_ENDPOINTS)};
CREATE TABLE IF NOT EXISTS sandboxes (name TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older database to `SCHEMA_VERSION`, in one transaction.

    0 -> 1: the endpoints table had UNIQUE (network_id, netns_key), which two reserved
    endpoints of one network would break; the table is rebuilt with a partial unique index.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    with conn:
        old = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'endpoints'"
        ).fetchone()
        if old is not None and "UNIQUE" in old[0]:
            conn.execute("ALTER TABLE endpoints RENAME TO endpoints_v0")
            for statement in _ENDPOINTS:  # not executescript: that would commit first
                conn.execute(statement)
            conn.execute(
                "INSERT INTO endpoints (id, network_id, netns_key, body) "
                "SELECT id, network_id, netns_key, body FROM endpoints_v0"
            )
            conn.execute("DROP TABLE endpoints_v0")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


_encode = msgspec.json.Encoder().encode


class State(msgspec.Struct, kw_only=True):
    """Everything the store holds, as loaded at start-up."""

    networks: list[Network]
    endpoints: list[Endpoint]
    sandboxes: list[Sandbox]
    meta: dict[str, str]


class Store:
    """The agent's sqlite database.

    Resource handling:
        `open_store` opens it (creating the schema) and closes it on exit.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def load(self) -> State:
        c = self._conn
        nets = [
            msgspec.json.decode(b, type=Network) for (b,) in c.execute("SELECT body FROM networks")
        ]
        eps = [
            msgspec.json.decode(b, type=Endpoint)
            for (b,) in c.execute("SELECT body FROM endpoints")
        ]
        sbs = [
            msgspec.json.decode(b, type=Sandbox) for (b,) in c.execute("SELECT body FROM sandboxes")
        ]
        meta = dict(c.execute("SELECT key, value FROM meta"))
        return State(networks=nets, endpoints=eps, sandboxes=sbs, meta=meta)

    @contextmanager
    def transaction(self) -> Iterator[Writer]:
        """One atomic, committed write: everything inside lands together or not at all."""
        with self._conn:
            yield Writer(self._conn)

    def close(self) -> None:
        self._conn.close()


class Writer:
    """The mutations available inside `Store.transaction()`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def put_network(self, net: Network) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO networks (id, name, body) VALUES (?, ?, ?)",
            (net.id, net.name, _encode(net)),
        )

    def delete_network(self, network_id: str) -> None:
        self._c.execute("DELETE FROM endpoints WHERE network_id = ?", (network_id,))
        self._c.execute("DELETE FROM networks WHERE id = ?", (network_id,))
        self._c.execute("DELETE FROM meta WHERE key = ?", (f"cursor:{network_id}",))

    def put_endpoint(self, ep: Endpoint) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO endpoints (id, network_id, netns_key, body) VALUES (?,?,?,?)",
            (ep.id, ep.network_id, ep.netns_key, _encode(ep)),
        )

    def delete_endpoint(self, endpoint_id: str) -> None:
        self._c.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,))

    def put_sandbox(self, sb: Sandbox) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO sandboxes (name, body) VALUES (?, ?)", (sb.name, _encode(sb))
        )

    def delete_sandbox(self, name: str) -> None:
        self._c.execute("DELETE FROM sandboxes WHERE name = ?", (name,))

    def set_meta(self, key: str, value: str) -> None:
        self._c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


@contextmanager
def open_store(state_dir: str | Path) -> Iterator[Store]:
    """Open (or create) `state_dir/netagent.db` in WAL mode."""
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path / "netagent.db", isolation_level=None, check_same_thread=False)
    conn.isolation_level = "DEFERRED"  # `with conn:` then commits or rolls back
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    _migrate(conn)
    conn.executescript(_SCHEMA)
    store = Store(conn)
    try:
        yield store
    finally:
        store.close()
