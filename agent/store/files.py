"""The database file itself: connecting, checking, recognising it, keeping a bad one aside.

Theory of operation. agentd is the only writer of its database, and in WAL mode the main file
changes only inside agentd's own commits (a checkpoint runs in a commit, or at close). So the
file's identity and stamp (`Stamp`: device, inode, size, mtime) taken after each commit must
be what the path shows before the next one; anything else means that someone deleted the file
(the path is gone: the connection writes into an unlinked inode nobody will read again),
replaced it (another inode) or wrote into it (same inode, another size or mtime: `sound`
then says whether it still reads as a database, for the log; either way it is rewritten, since
its next checkpoint would mix our pages with theirs). `sqlite3` itself notices neither of the
first two, and the third only when it happens to read a damaged page.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import msgspec

#: sqlite's primary result codes that mean "this file is not (or no longer) a sound database"
CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
SUFFIXES = ("", "-wal", "-shm")


class Stamp(msgspec.Struct, frozen=True):
    """What `os.stat` says of the database file; equal stamps: nobody else touched it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int


def stamp(path: Path) -> Stamp | None:
    """The file's stamp now; None if the path does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether sqlite's error says the file is damaged or not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in CORRUPT_CODES


def connect(path: Path) -> sqlite3.Connection:
    """Open `path` in WAL mode; raises `sqlite3.DatabaseError` on a file that is not one."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.isolation_level = "DEFERRED"  # `with conn:` then commits or rolls back
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def quick_check(conn: sqlite3.Connection) -> str | None:
    """None if `PRAGMA quick_check` finds the database sound, else what it (or sqlite) said."""
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows[:5])


def sound(path: Path) -> str | None:
    """None if the file at `path` opens and passes `quick_check` in a fresh connection (not
    the writer's, whose page cache may still hold the old pages), else the problem."""
    try:
        conn = sqlite3.connect(path, check_same_thread=False)  # reads only: no journal change
    except sqlite3.Error as exc:
        return str(exc)
    try:
        return quick_check(conn)
    finally:
        conn.close()


def keep_aside(path: Path, *, move: bool) -> Path | None:
    """Keep the bad database as `<name>.corrupt-<UTC time>` (with its `-wal`, if any), by
    renaming it (`move`, at start) or copying it (while running: the old connection still
    has it open and may checkpoint into it when closed; renamed after all if there is no
    room for a copy). The copy's path, or None if there was no file."""
    if not path.exists():
        return None
    when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = path.with_name(f"{path.name}.corrupt-{when}")
    n = 1
    while copy.exists():
        copy = path.with_name(f"{path.name}.corrupt-{when}.{n}")
        n += 1
    for suffix in SUFFIXES[:2]:
        src = Path(f"{path}{suffix}")
        if not src.exists():
            continue
        if not move:
            try:
                shutil.copyfile(src, f"{copy}{suffix}")
                continue
            except OSError:  # no room for a copy (a full disk): keep the file itself
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
        os.replace(src, f"{copy}{suffix}")
    return copy


def remove(path: Path) -> None:
    """Delete the database file and its `-wal`/`-shm` (an old WAL must never be replayed
    into a new file of the same name)."""
    for suffix in SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
