"""The store under faults, on a real sqlite file: deleted, replaced or damaged while open,
damaged at start, and (in a tiny tmpfs) a full disk. No acknowledged write is ever lost."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.errors import StorageError
from agent.core.model import Endpoint, Network
from agent.store.sqlite import DB_NAME, open_store


def _net(i: int) -> Network:
    return Network(
        id=f"{i:064x}",
        name=f"n{i}",
        bridge=f"br-{i:012x}",
        subnet=f"10.{i}.0.0/24",
        gateway=f"10.{i}.0.1",
    )


def _ep(i: int, net: Network) -> Endpoint:
    return Endpoint(
        id=f"{i + 100:064x}",
        network_id=net.id,
        netns=f"/run/netns/c{i}",
        netns_key=f"4:{i}",
        ifname="eth0",
        host_ifname=f"na{i:013x}",
        ip=f"10.{net.name[1:]}.0.{i + 2}",
        mac="02:42:0a:00:00:02",
    )


def _on_disk(state_dir: Path) -> tuple[set[str], set[str]]:
    """Network and endpoint ids in the file, read by a fresh connection (a restart's view)."""
    with open_store(state_dir) as again:
        state = again.load()
        assert again.opened == "existing"
    return {n.id for n in state.networks}, {e.id for e in state.endpoints}


def _put(store, *values) -> None:
    with store.transaction() as w:
        for v in values:
            w.put_network(v) if isinstance(v, Network) else w.put_endpoint(v)


def test_a_database_deleted_while_open_is_rewritten_before_the_next_write_lands(
    tmp_path: Path,
) -> None:
    a, b = _net(1), _net(2)
    with open_store(tmp_path) as store:
        _put(store, a, _ep(1, a))
        for suffix in ("", "-wal", "-shm"):  # `rm -f netagent.db*`
            Path(f"{tmp_path / DB_NAME}{suffix}").unlink(missing_ok=True)
        _put(store, b)  # acknowledged: must be durable, with everything before it
        assert [r for r, _ in store.recoveries] == ["deleted"]
        assert _on_disk(tmp_path) == ({a.id, b.id}, {_ep(1, a).id})


def test_a_database_deleted_alone_is_noticed_by_verify_and_at_close(tmp_path: Path) -> None:
    a = _net(1)
    with open_store(tmp_path) as store:
        _put(store, a)
        (tmp_path / DB_NAME).unlink()  # the -wal and -shm stay: never replayed into a new file
        assert store.verify() == "deleted"
        assert store.verify() is None
        assert _on_disk(tmp_path) == ({a.id}, set())
        (tmp_path / DB_NAME).unlink()
    assert _on_disk(tmp_path) == ({a.id}, set())  # close rewrote it


def test_a_database_replaced_while_open_is_kept_aside_and_rewritten(tmp_path: Path) -> None:
    a, b = _net(1), _net(2)
    with open_store(tmp_path) as store:
        _put(store, a)
        db = tmp_path / DB_NAME
        db.unlink()
        db.write_bytes(b"not a database at all")
        _put(store, b)
        assert [r for r, _ in store.recoveries] == ["replaced"]
        kept = store.recoveries[0][1]
        assert kept is not None and kept.read_bytes() == b"not a database at all"
        assert _on_disk(tmp_path) == ({a.id, b.id}, set())


def test_garbage_written_into_the_open_database_is_detected_and_rewritten(tmp_path: Path) -> None:
    nets = [_net(i) for i in range(1, 6)]
    with open_store(tmp_path) as store:
        _put(store, *nets[:4])
        store.verify()  # nothing wrong yet
        assert store.recoveries == []
        db = tmp_path / DB_NAME
        with open(db, "r+b") as f:  # same inode, every page overwritten
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            f.write(b"\xa5" * max(size, 8192))
        _put(store, nets[4])
        # "modified" while the WAL still holds every page (it reads as sound), else "corrupt"
        assert [r for r, _ in store.recoveries] in (["corrupt"], ["modified"])
        kept = store.recoveries[0][1]
        assert kept is not None and kept.name.startswith(f"{DB_NAME}.corrupt-")
        assert kept.read_bytes().startswith(b"\xa5" * 64)
        assert _on_disk(tmp_path) == ({n.id for n in nets}, set())


def test_a_corrupt_database_at_start_is_kept_aside_and_a_new_one_made(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        _put(store, _net(1))
    db = tmp_path / DB_NAME
    db.write_bytes(b"\x00garbage" * 1000)
    with open_store(tmp_path) as store:
        assert store.opened == "corrupt"
        assert store.load().networks == []
        _put(store, _net(2))
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(f"{DB_NAME}.corrupt-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"\x00garbage" * 1000
    assert _on_disk(tmp_path) == ({_net(2).id}, set())


def test_a_record_that_does_not_decode_at_start_counts_as_corrupt(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        _put(store, _net(1))
        with store._conn:
            store._conn.execute("UPDATE networks SET body = x'7b7b'")  # "{{"
    with open_store(tmp_path) as store:
        assert store.opened == "corrupt" and store.load().networks == []


def test_a_missing_database_opens_as_new(tmp_path: Path) -> None:
    with open_store(tmp_path / "state") as store:
        assert store.opened == "new"
    with open_store(tmp_path / "state") as store:
        assert store.opened == "existing"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 512 KiB tmpfs (the test runs in test.sh's private mount namespace)."""
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tiny", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> Path:
    """Fill the tmpfs up to its last byte."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.kernel
def test_a_full_disk_fails_with_storage_error_and_changes_nothing(tiny_tmpfs: Path) -> None:
    nets = [_net(i) for i in range(1, 40)]
    with open_store(tiny_tmpfs) as store:
        _put(store, nets[0])
        filler = _fill(tiny_tmpfs)
        with pytest.raises(StorageError, match="full"):
            for net in nets[1:]:  # the WAL's space is reused until it must grow
                _put(store, net, *(_ep(j, net) for j in range(60)))
        written = {n.id for n in store.snapshot().networks}
        assert {n.id for n in store.load().networks} == written  # the mirror is what is durable
        failed = next(n for n in nets if n.id not in written)
        assert failed.id not in {n.id for n in store.load().networks}
        filler.unlink()
        _put(store, failed)  # space again: writes work
    assert _on_disk(tiny_tmpfs)[0] == written | {failed.id}


@pytest.mark.kernel
def test_a_lost_database_on_a_full_disk_refuses_writes_until_it_can_be_rewritten(
    tiny_tmpfs: Path,
) -> None:
    a, b = _net(1), _net(2)
    with open_store(tiny_tmpfs) as store:
        _put(store, a)
        db = tiny_tmpfs / DB_NAME
        filler = _fill(tiny_tmpfs)
        with open(db, "r+b") as f:
            f.write(b"\xa5" * 4096)  # damaged, and no room for a copy or a new file
        with pytest.raises(StorageError, match="cannot be rewritten"):
            _put(store, b)
        assert store.snapshot().networks == [a]  # not acknowledged, not recorded
        with pytest.raises(StorageError):
            store.verify()
        filler.unlink()
        _put(store, b)
    assert _on_disk(tiny_tmpfs)[0] == {a.id, b.id}


FAULTS = ("none", "delete", "delete_all", "replace", "garbage")


def _fault(db: Path, fault: str) -> None:
    if fault in ("delete", "delete_all"):
        for suffix in ("", "-wal", "-shm") if fault == "delete_all" else ("",):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    elif fault == "replace":
        db.unlink(missing_ok=True)
        db.write_bytes(b"someone else's file")
    elif fault == "garbage" and db.exists():
        with open(db, "r+b") as f:
            f.write(b"\x5a" * 4096)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(("put_net", "del_net", "put_ep", "del_ep")),
            st.integers(1, 4),
            st.sampled_from(FAULTS),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_no_acknowledged_write_is_lost_whatever_happens_to_the_file(steps) -> None:
    """A model of what was acknowledged against what a restart reads, after every step."""
    with tempfile.TemporaryDirectory() as d:
        nets: dict[str, Network] = {}
        eps: dict[str, Endpoint] = {}
        with open_store(d) as store:
            for op, i, fault in steps:
                _fault(Path(d) / DB_NAME, fault)
                net = _net(i)
                with store.transaction() as w:
                    if op == "put_net":
                        w.put_network(net)
                        nets[net.id] = net
                    elif op == "del_net":
                        w.delete_network(net.id)
                        nets.pop(net.id, None)
                        eps = {k: e for k, e in eps.items() if e.network_id != net.id}
                    elif op == "put_ep" and net.id in nets:
                        w.put_endpoint(_ep(i, net))
                        eps[_ep(i, net).id] = _ep(i, net)
                    elif op == "del_ep":
                        w.delete_endpoint(_ep(i, net).id)
                        eps.pop(_ep(i, net).id, None)
                assert _on_disk(Path(d)) == (set(nets), set(eps))
                snap = store.snapshot()
                assert {n.id for n in snap.networks} == set(nets)
                assert {e.id for e in snap.endpoints} == set(eps)


def test_a_rewrite_that_fails_halfway_never_leaves_a_partial_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite goes to a file beside the database and is renamed over it only when whole:
    a crash (here: an error) in the middle leaves no file that holds part of the state."""
    from agent.store import sqlite as store_module

    nets = [_net(i) for i in range(1, 4)]
    with open_store(tmp_path) as store:
        _put(store, *nets)
        os.unlink(tmp_path / DB_NAME)
        real, calls = store_module._execute, []

        def failing(conn, op) -> None:
            calls.append(op)
            if len(calls) == 2:  # the second record of the rewrite
                raise store_module.sqlite3.OperationalError("disk I/O error")
            real(conn, op)

        monkeypatch.setattr(store_module, "_execute", failing)
        with pytest.raises(StorageError):
            _put(store, _net(9))
        assert not (tmp_path / DB_NAME).exists()  # not a database with one network of three
        monkeypatch.setattr(store_module, "_execute", real)
        _put(store, _net(9))  # the next write rewrites it whole
    assert _on_disk(tmp_path)[0] == {n.id for n in [*nets, _net(9)]}
