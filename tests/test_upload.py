"""The one upload protocol (cr_queue/store/upload.py), for both locations of a store.

Each test runs against the database store and the shared-directory store:
the bytes go to binary_data or to a file, and the rest (the duplicate found
in the statement that would make the row, the seal, the careful path after
a unique violation, what an interrupted upload leaves) is the same code.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from cr_queue import store
from cr_queue.tomodir import archive, synth

KINDS = ["db", "dir"]


def _store(kind: str, tmp_path: Path) -> store.Store:
    if kind == "db":
        return store.DATABASE
    root = tmp_path / "crq"
    root.mkdir(exist_ok=True)
    return store.DirectoryStore(root)


def _packed(tree: Path) -> store.Packed:
    buf = io.BytesIO()
    result = archive.pack(tree, buf)
    data = buf.getvalue()
    return [data[i : i + 500] for i in range(0, len(data), 500)], result


def _rows(conn) -> list[tuple]:
    return conn.execute("SELECT sha256, complete, location, n_chunks FROM blobs ORDER BY id").fetchall()


def _files(where: store.Store) -> list[str]:
    if not isinstance(where, store.DirectoryStore):
        return []
    return sorted(p.name for p in where.path.rglob("*") if p.is_file())


def _fetched(conn, where: store.Store, sha: str) -> bytes:
    out = io.BytesIO()
    store.fetch(conn, where, sha, out)
    return out.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_a_duplicate_leaves_nothing_behind(kind: str, conn, tmp_path: Path) -> None:
    """Streamed or delivered in memory, alone or in a batch: content stored already
    gets no second row, no chunks and no second file."""
    where = _store(kind, tmp_path)
    tree = synth.make_tomodir(tmp_path / "td", "inv")
    first = store.put_tree(conn, where, tree)
    before = (_rows(conn), conn.execute("SELECT count(*) FROM binary_data").fetchone()[0], _files(where))
    assert store.put_tree(conn, where, tree).sha256 == first.sha256
    store.put_many(conn, where, [_packed(tree), _packed(tree)])
    after = (_rows(conn), conn.execute("SELECT count(*) FROM binary_data").fetchone()[0], _files(where))
    assert after == before
    assert before[0] == [(first.sha256, True, kind, 0 if kind == "dir" else 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_an_interrupted_upload_leaves_nothing_behind(kind: str, conn, tmp_path: Path) -> None:
    """The producer fails after some batches went in (database: rows and chunks made by
    the COPY thread; directory: a temporary file): nothing of it stays."""
    where = _store(kind, tmp_path)

    def produce(out) -> archive.PackResult:
        for _ in range(10):
            out.write(b"x" * 1000)
        raise OSError("the tomodir went away")

    upload = store.Upload(conn, where, chunk_size=100, batch_bytes=300)
    with pytest.raises(OSError, match="went away"):
        produce(upload)
    upload.flush()
    if kind == "db":
        assert conn.execute("SELECT count(*) FROM binary_data").fetchone()[0] > 0, "batches were in"
    upload.abort()
    with pytest.raises(OSError, match="went away"):
        store.put_stream(conn, where, produce)
    assert _rows(conn) == []
    assert conn.execute("SELECT count(*) FROM binary_data").fetchone()[0] == 0
    assert _files(where) == []


def _waiting_for_a_lock(observer, pid: int) -> bool:
    row = observer.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_seal_that_meets_a_unique_violation_keeps_the_copy_sealed_first(
    kind: str, batch: bool, db_url: str, tmp_path: Path
) -> None:
    """Two uploads of the same content at once: ours made its row while the other was
    still uncommitted, so its seal waits on the other's and fails with a unique
    violation when that commits.  It is rolled back and each archive takes the
    careful path: the content is stored once, every archive of the batch is stored,
    and nothing of the losing upload remains."""
    where = _store(kind, tmp_path)
    tree = synth.make_tomodir(tmp_path / "td", "inv", seed=1)
    other = synth.make_tomodir(tmp_path / "other", "inv", seed=2)
    with psycopg.connect(db_url, autocommit=True) as ours, psycopg.connect(db_url, autocommit=True) as theirs, \
            psycopg.connect(db_url, autocommit=True) as observer:
        outcome: list[object] = []

        def upload() -> None:
            try:
                if batch:
                    store.put_many(ours, where, [_packed(tree), _packed(other)])
                    outcome.append(None)
                else:
                    outcome.append(store.put_tree(ours, where, tree).sha256)
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                outcome.append(exc)

        with theirs.transaction():
            # Theirs is sealed but not committed (an upload inside a caller's transaction).
            sha = store.put_tree(theirs, where, tree).sha256
            thread = threading.Thread(target=upload)
            thread.start()
            deadline = time.monotonic() + 120
            while not _waiting_for_a_lock(observer, ours.info.backend_pid):
                assert thread.is_alive() and time.monotonic() < deadline, f"our seal never waited: {outcome}"
                time.sleep(0.01)
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert outcome == [None if batch else sha]
        rows = _rows(ours)
        assert [r[0] for r in rows if r[0] == sha] == [sha], "stored once"
        assert all(r[1] and r[2] == kind for r in rows), "no unsealed row left"
        assert len(rows) == (2 if batch else 1)
        assert _fetched(ours, where, sha) == b"".join(_packed(tree)[0])
        if batch:
            assert _fetched(ours, where, archive.pack(other, io.BytesIO()).sha256) == b"".join(_packed(other)[0])
        chunks = ours.execute("SELECT count(*) FROM binary_data").fetchone()[0]
        assert chunks == sum(r[3] for r in rows), "no chunk of the losing upload remains"
        assert not [name for name in _files(where) if name.endswith(".part")]


@pytest.mark.parametrize("kind", KINDS)
def test_an_upload_inside_the_callers_transaction_is_the_callers_to_commit(kind: str, conn, tmp_path: Path) -> None:
    """Inside a transaction the upload is a savepoint: it neither commits nor changes how the
    caller's commit waits for the disk, and it goes with a rollback."""
    where = _store(kind, tmp_path)
    conn.execute("SET synchronous_commit = on")
    with conn.transaction() as tx:
        sha = store.put_tree(conn, where, synth.make_tomodir(tmp_path / "td", "inv")).sha256
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert _rows(conn) == [(sha, True, kind, 0 if kind == "dir" else 1)]
        raise psycopg.Rollback(tx)
    assert _rows(conn) == []


def _round_trips(conn, fn) -> int:
    """How often the client waited for the server while ``fn`` ran (ReadyForQuery messages)."""
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        try:
            fn()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return sum(1 for line in trace.read().decode(errors="replace").splitlines() if "\tB\t" in line and "ReadyForQuery" in line)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trips_of_an_upload(kind: str, conn, tmp_path: Path) -> None:
    """BEGIN travels with the statement that finds a duplicate or makes the row, COMMIT with
    the seal, and a batch costs what one archive costs (docs/performance.md, rounds four and five)."""
    where = _store(kind, tmp_path)
    trees = [synth.make_tomodir(tmp_path / f"td{i}", "inv", seed=i) for i in range(5)]
    copy = 1 if kind == "db" else 0  # the chunks still in memory: one COPY (a file was written before)
    assert _round_trips(conn, lambda: store.put_tree(conn, where, trees[0])) == 2 + copy
    assert _round_trips(conn, lambda: store.put_tree(conn, where, trees[0])) == 2  # found, COMMIT
    assert _round_trips(conn, lambda: store.put_many(conn, where, [_packed(t) for t in trees[1:]])) == 2 + copy
