"""Desired state in sqlite3 (WAL): networks, endpoints, sandboxes and allocator cursors.

Theory of operation: the store holds what the agent *wants*; the kernel is observed state.
Each mutation is one transaction committed before the request is answered, so after a
`kill -9` a restart sees every change a client was told about. `synchronous=NORMAL` in WAL mode
survives a process crash (the WAL is in the page cache); only a power loss could drop the last
transactions, which the restart's adoption then repairs from the kernel's view.

Calls are synchronous and short (tens of microseconds): the service calls them from the Trio
thread between kernel steps.

Faults (see `agent.store.files`). A write that fails (disk full, I/O error) raises
`StorageError` and changes nothing: the service then undoes its kernel and firewall steps. The
store keeps a mirror of everything committed, in memory; if the database file is deleted,
replaced or damaged while agentd runs (checked before and after each commit, and by `verify`),
it writes a fresh database from the mirror (a damaged or foreign file is kept aside as
`netagent.db.corrupt-<time>`), so no change is acknowledged that is not durable, and a restart
finds everything acknowledged. If that rewrite fails too, every write fails with
`StorageError` until one succeeds. At open, a database that is not one, or fails
`PRAGMA quick_check`, is kept aside and a new one started (`Store.opened` says so: the daemon
then rebuilds the state from the kernel's ownership marks).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import msgspec

from agent.core.errors import StorageError
from agent.core.model import Endpoint, Network, Sandbox
from agent.log import get_logger
from agent.store import files

log = get_logger("agent.store")

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
DB_NAME = "netagent.db"

#: how the database was found at open: a sound one, none, or one kept aside as corrupt
Opened = Literal["existing", "new", "corrupt"]


class State(msgspec.Struct, kw_only=True):
    """Everything the store holds, as loaded at start-up."""

    networks: list[Network]
    endpoints: list[Endpoint]
    sandboxes: list[Sandbox]
    meta: dict[str, str]


class _Mirror:
    """What is committed, in memory, kept equal to the database by the same operations."""

    def __init__(self, state: State) -> None:
        self.networks = {n.id: n for n in state.networks}
        self.endpoints = {e.id: e for e in state.endpoints}
        self.sandboxes = {s.name: s for s in state.sandboxes}
        self.meta = dict(state.meta)

    def state(self) -> State:
        return State(
            networks=list(self.networks.values()),
            endpoints=list(self.endpoints.values()),
            sandboxes=list(self.sandboxes.values()),
            meta=dict(self.meta),
        )

    def ops(self) -> list[_Op]:
        """The operations that write all of it into an empty database."""
        out: list[_Op] = [("put_network", n) for n in self.networks.values()]
        out += [("put_endpoint", e) for e in self.endpoints.values()]
        out += [("put_sandbox", s) for s in self.sandboxes.values()]
        out += [("set_meta", (k, v)) for k, v in self.meta.items()]
        return out

    def apply(self, op: _Op) -> None:
        name, arg = op
        if name == "put_network":
            assert isinstance(arg, Network)
            self.networks[arg.id] = arg
        elif name == "delete_network":
            assert isinstance(arg, str)
            self.networks.pop(arg, None)
            for ep in [e for e in self.endpoints.values() if e.network_id == arg]:
                del self.endpoints[ep.id]
            self.meta.pop(f"cursor:{arg}", None)
        elif name == "put_endpoint":
            assert isinstance(arg, Endpoint)
            self.endpoints[arg.id] = arg
        elif name == "delete_endpoint":
            assert isinstance(arg, str)
            self.endpoints.pop(arg, None)
        elif name == "put_sandbox":
            assert isinstance(arg, Sandbox)
            self.sandboxes[arg.name] = arg
        elif name == "delete_sandbox":
            assert isinstance(arg, str)
            self.sandboxes.pop(arg, None)
        else:
            assert isinstance(arg, tuple)
            self.meta[arg[0]] = arg[1]


_Op = tuple[str, "Network | Endpoint | Sandbox | str | tuple[str, str]"]


def _execute(c: sqlite3.Connection, op: _Op) -> None:
    """One operation in SQL (inside the caller's transaction)."""
    name, arg = op
    if name == "put_network":
        assert isinstance(arg, Network)
        c.execute(
            "INSERT OR REPLACE INTO networks (id, name, body) VALUES (?, ?, ?)",
            (arg.id, arg.name, _encode(arg)),
        )
    elif name == "delete_network":
        c.execute("DELETE FROM endpoints WHERE network_id = ?", (arg,))
        c.execute("DELETE FROM networks WHERE id = ?", (arg,))
        c.execute("DELETE FROM meta WHERE key = ?", (f"cursor:{arg}",))
    elif name == "put_endpoint":
        assert isinstance(arg, Endpoint)
        c.execute(
            "INSERT OR REPLACE INTO endpoints (id, network_id, netns_key, body) VALUES (?,?,?,?)",
            (arg.id, arg.network_id, arg.netns_key, _encode(arg)),
        )
    elif name == "delete_endpoint":
        c.execute("DELETE FROM endpoints WHERE id = ?", (arg,))
    elif name == "put_sandbox":
        assert isinstance(arg, Sandbox)
        c.execute(
            "INSERT OR REPLACE INTO sandboxes (name, body) VALUES (?, ?)", (arg.name, _encode(arg))
        )
    elif name == "delete_sandbox":
        c.execute("DELETE FROM sandboxes WHERE name = ?", (arg,))
    else:
        assert isinstance(arg, tuple)
        c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", arg)


def _load(c: sqlite3.Connection) -> State:
    def bodies(table: str) -> list[bytes]:
        return [b for (b,) in c.execute(f"SELECT body FROM {table}")]

    return State(
        networks=[msgspec.json.decode(b, type=Network) for b in bodies("networks")],
        endpoints=[msgspec.json.decode(b, type=Endpoint) for b in bodies("endpoints")],
        sandboxes=[msgspec.json.decode(b, type=Sandbox) for b in bodies("sandboxes")],
        meta=dict(c.execute("SELECT key, value FROM meta")),
    )


def _prepare(path: Path) -> sqlite3.Connection:
    """Connect, migrate and create the schema (raises sqlite3.Error on a bad file)."""
    conn = files.connect(path)
    try:
        _migrate(conn)
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class Store:
    """The agent's sqlite database, with a mirror of it in memory.

    Resource handling:
        `open_store` opens it (creating the schema) and closes it on exit.

    Error handling:
        A write that cannot be made durable raises `StorageError` (nothing changed); a file
        found deleted, replaced or damaged is rewritten from the mirror (see the module doc).
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, state: State, opened: Opened) -> None:
        self.path = path
        self.opened: Opened = opened
        self.recoveries: list[tuple[str, Path | None]] = []  # (reason, copy kept) while running
        self._conn = conn
        self._mirror = _Mirror(state)
        self._lost: str | None = None  # why the file must be rewritten before the next write
        self._failure = ""  # the last rewrite's error, logged once (agentd retries each second)
        self._stamp = files.stamp(path)

    def load(self) -> State:
        """Everything in the database file (read from it, not from the mirror)."""
        return _load(self._conn)

    def snapshot(self) -> State:
        """Everything committed, from the mirror."""
        return self._mirror.state()

    @contextmanager
    def transaction(self) -> Iterator[Writer]:
        """One atomic, committed write: everything inside lands together or not at all."""
        w = Writer()
        yield w
        self._commit(w.ops)

    def verify(self) -> str | None:
        """Check the file now; rewrite it from the mirror if it was lost. Returns why it was
        rewritten, or None. Raises `StorageError` if it had to be and could not be."""
        reason = self._lost or self._check()
        if reason is not None:
            self._recover([], reason)
        return reason

    def close(self) -> None:
        with contextlib.suppress(StorageError):  # the last chance to leave a durable file
            self.verify()
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    # -- commits and recovery -------------------------------------------------------------

    def _commit(self, ops: list[_Op]) -> None:
        reason = self._lost or self._check()
        if reason is None:
            try:
                with self._conn:
                    for op in ops:
                        _execute(self._conn, op)
            except sqlite3.IntegrityError:
                raise  # a broken invariant of the caller, not of the storage
            except sqlite3.Error as exc:
                if not files.is_corruption(exc):
                    raise StorageError(f"cannot write the state database: {exc}") from exc
                reason = "corrupt"
            except OSError as exc:
                raise StorageError(f"cannot write the state database: {exc}") from exc
            else:
                reason = self._check(after_commit=True)
        if reason is not None:
            self._recover(ops, reason)  # the change goes into the new file too
        for op in ops:
            self._mirror.apply(op)

    def _check(self, *, after_commit: bool = False) -> str | None:
        """Why the file must be rewritten ("deleted", "replaced", "corrupt", "modified"), or
        None."""
        now = files.stamp(self.path)
        old = self._stamp
        if now is None:
            return "deleted"
        if old is None or (now.dev, now.ino) != (old.dev, old.ino):
            return "replaced"
        if now != old and not after_commit:
            # written by someone else: even if it still reads as sound (the WAL may hold every
            # page for now), its next checkpoint would mix our pages with theirs
            problem = files.sound(self.path)
            log.warning("store.modified", path=str(self.path), problem=problem)
            return "modified" if problem is None else "corrupt"
        self._stamp = now  # our own commit (a checkpoint)
        return None

    def _recover(self, ops: list[_Op], reason: str) -> None:
        copy = None
        if reason != "deleted" and self._lost is None:  # never keep our own half-written file
            with contextlib.suppress(OSError):
                copy = files.keep_aside(self.path, move=False)
        self._lost = reason
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()  # a checkpoint into the unlinked or kept file, or nothing
        conn = None
        new = self.path.with_name(self.path.name + ".new")
        try:
            # written whole beside it, then renamed over it: a crash mid-rewrite never leaves
            # a database that holds only part of the state
            files.remove(new)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = _prepare(new)
            with conn:
                for op in [*self._mirror.ops(), *ops]:
                    _execute(conn, op)
            conn.close()  # checkpointed into the file: no -wal left
            conn = None
            for suffix in files.SUFFIXES[1:]:  # the old file's WAL must not replay into it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            os.replace(new, self.path)
            conn = files.connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            with contextlib.suppress(OSError):
                files.remove(new)
            if str(exc) != self._failure:
                log.error("store.recover.failed", reason=reason, error=str(exc))
                self._failure = str(exc)
            raise StorageError(
                f"the state database was {reason} and cannot be rewritten: {exc}", reason=reason
            ) from exc
        self._conn = conn
        self._lost = None
        self._failure = ""
        self._stamp = files.stamp(self.path)
        self.recoveries.append((reason, copy))
        log.warning(
            "store.recovered",
            reason=reason,
            path=str(self.path),
            kept=str(copy) if copy else None,
            networks=len(self._mirror.networks),
            endpoints=len(self._mirror.endpoints),
        )


class Writer:
    """The mutations available inside `Store.transaction()` (applied at its end)."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []

    def put_network(self, net: Network) -> None:
        self.ops.append(("put_network", net))

    def delete_network(self, network_id: str) -> None:
        self.ops.append(("delete_network", network_id))

    def put_endpoint(self, ep: Endpoint) -> None:
        self.ops.append(("put_endpoint", ep))

    def delete_endpoint(self, endpoint_id: str) -> None:
        self.ops.append(("delete_endpoint", endpoint_id))

    def put_sandbox(self, sb: Sandbox) -> None:
        self.ops.append(("put_sandbox", sb))

    def delete_sandbox(self, name: str) -> None:
        self.ops.append(("delete_sandbox", name))

    def set_meta(self, key: str, value: str) -> None:
        self.ops.append(("set_meta", (key, value)))


@contextmanager
def open_store(state_dir: str | Path) -> Iterator[Store]:
    """Open (or create) `state_dir/netagent.db` in WAL mode. A file that is not a sound
    database (open, `quick_check`, schema or records fail) is kept aside and a new one made."""
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = path / DB_NAME
    opened: Opened = "existing" if db.exists() else "new"
    conn = None
    try:
        conn = _prepare(db)
        problem = files.quick_check(conn)
        state = _load(conn) if problem is None else None
    except (sqlite3.DatabaseError, msgspec.DecodeError) as exc:
        problem, state = str(exc), None
    if conn is None or state is None:
        if conn is not None:
            conn.close()
        copy = files.keep_aside(db, move=True)
        files.remove(db)
        log.error("store.corrupt.at_start", path=str(db), problem=problem, kept=str(copy))
        opened = "corrupt"
        conn = _prepare(db)
        state = _load(conn)
    store = Store(db, conn, state, opened)
    try:
        yield store
    finally:
        store.close()
