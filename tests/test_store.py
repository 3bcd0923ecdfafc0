"""The archive stores (database and shared directory), the pipelined upload, garbage collection."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import socket
import tarfile
import time
from pathlib import Path

import psycopg
import pytest

from cr_queue import config
from cr_queue.tomodir import archive
from cr_queue.tomodir.archive import headers
from cr_queue.queries import jobs
from cr_queue import store
from cr_queue.tomodir import synth
from cr_queue.database import open_database
from cr_queue.db.connection import Database, DatabaseError
from cr_queue.store import upload

from .conftest import run, script
from .test_queue import ACTOR, _queued, _worker


def _db(url: str, path: Path | None = None) -> Database:
    chosen = store.DirectoryStore(path) if path is not None else store.DATABASE
    return Database(url=url, source="test", embedded=False, store=chosen)


def _directory_db(url: str, root: Path) -> Database:
    """A Database whose archives go to `root`, a new and empty directory."""
    root.mkdir()
    return _db(url, root)


def _put(conn, where, path: Path, kind: str = "inv", **synth_kw) -> str:
    """Stores a new synthetic tomodir made at `path` in `where`; its archive's sha256."""
    return store.put_tree(conn, where, synth.make_tomodir(path, kind, **synth_kw)).sha256


def _fetch(conn, where: store.Store, sha: str) -> bytes:
    out = io.BytesIO()
    store.fetch(conn, where, sha, out)
    return out.getvalue()


# ------------------------------------------------------------ database store


def test_pipelined_upload_of_many_batches_round_trips(conn) -> None:
    payload = os.urandom(40 * 1000 + 17)
    writer = store.Upload(conn, store.DATABASE, chunk_size=1000, batch_bytes=4000, depth=2)
    for i in range(0, len(payload), 777):
        writer.write(payload[i : i + 777])
    sha = hashlib.sha256(payload).hexdigest()
    writer.seal(sha, len(payload))
    assert _fetch(conn, store.DATABASE, sha) == payload
    n_chunks, location = conn.execute("SELECT n_chunks, location FROM blobs WHERE sha256 = %s", (sha,)).fetchone()
    assert (n_chunks, location) == (41, "db")


def test_same_content_is_stored_once(conn, tmp_path: Path) -> None:
    tree = synth.make_tomodir(tmp_path / "td", "inv")
    first = store.put_tree(conn, store.DATABASE, tree)
    second = store.put_tree(conn, store.DATABASE, tree)
    assert first.sha256 == second.sha256
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1


def test_failed_upload_leaves_no_blob(conn, tmp_path: Path) -> None:
    writer = store.Upload(conn, store.DATABASE, chunk_size=100, batch_bytes=300)
    writer.write(os.urandom(1000))  # three batches went to the COPY thread
    writer.abort()
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM binary_data").fetchone()[0] == 0


def _in_memory(tree: Path, piece: int = 700) -> store.Packed:
    """A tomodir's archive as crh_add's helpers deliver it: in pieces, with its PackResult."""
    buf = io.BytesIO()
    result = archive.pack(tree, buf)
    data = buf.getvalue()
    return [data[i : i + piece] for i in range(0, len(data), piece)], result


@pytest.mark.parametrize("kind", ["db", "dir"])
def test_archives_in_memory_are_stored_together_once_each(kind: str, db_url: str, tmp_path: Path) -> None:
    """store.put_many: four archives, two of them the same bytes, one of them stored
    before; each ends up stored once, whole, under its hash (the database store cut
    into chunks as a streamed upload would be)."""
    root = tmp_path / "crq"
    root.mkdir()
    trees = [synth.make_tomodir(tmp_path / f"td{i}", "inv", nx=12, nz=6, seed=i) for i in range(3)]
    twin = tmp_path / "twin"
    os.system(f"cp -a {trees[0]} {twin}")
    packed = [_in_memory(t) for t in [*trees, twin]]
    assert packed[0][1].sha256 == packed[3][1].sha256
    db = _db(db_url, root if kind == "dir" else None)
    with db.connect("test") as conn:
        store.put_tree(conn, db.store, trees[2])
        store.put_many(conn, db.store, packed, chunk_size=1000)
        rows = conn.execute("SELECT sha256, location, complete, size, n_chunks FROM blobs ORDER BY id").fetchall()
        assert len(rows) == 3 and all(r[1:3] == (kind, True) for r in rows)
        for pieces, result in packed:
            assert _fetch(conn, db.store, result.sha256) == b"".join(pieces)
            size, n_chunks = conn.execute("SELECT size, n_chunks FROM blobs WHERE sha256 = %s", (result.sha256,)).fetchone()
            assert size == result.size
            stored_before = result.sha256 == packed[2][1].sha256  # one 1 MiB chunk, by put_tree
            assert n_chunks == (0 if kind == "dir" else 1 if stored_before else -(-size // 1000))
    if kind == "dir":
        assert sorted(p.name for p in root.rglob("*.tar.zst")) == sorted(f"{r[0]}.tar.zst" for r in rows)
        assert not [p for p in root.iterdir() if p.name.endswith(".part")]


def test_rechunk_cuts_pieces_at_the_chunk_size() -> None:
    data = os.urandom(10_000)
    for piece in (1, 999, 1000, 1001, 4096, 10_000):
        pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
        chunks = list(upload._rechunk(pieces, 1000))
        assert b"".join(chunks) == data
        assert [len(c) for c in chunks] == [1000] * 10


# ----------------------------------------------------------- directory store


def test_directory_store_writes_content_addressed_files(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "crq"
    tree = synth.make_tomodir(tmp_path / "td", "inv")
    db = _directory_db(db_url, root)
    with db.connect("test") as conn:
        packed = store.put_tree(conn, db.store, tree)
        path = root / packed.sha256[:2] / f"{packed.sha256}.tar.zst"
        assert path.is_file() and path.stat().st_size == packed.size
        assert archive.sha256_file(path) == packed.sha256
        assert not [p for p in root.iterdir() if p.name.endswith(".part")]
        row = conn.execute("SELECT location, complete, n_chunks, size FROM blobs WHERE sha256 = %s", (packed.sha256,)).fetchone()
        assert row == ("dir", True, 0, packed.size)
        assert conn.execute("SELECT count(*) FROM binary_data").fetchone()[0] == 0
        again = store.put_tree(conn, db.store, tree)
        assert again.sha256 == packed.sha256
        assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1
        out = tmp_path / "out.tar.zst"
        with open(out, "wb") as fh:
            store.fetch(conn, db.store, packed.sha256, fh)
        with open(out, "rb") as fh:
            archive.unpack(fh, tmp_path / "back", limits=archive.Limits())
    assert (tmp_path / "back" / "grid" / "elem.dat").read_bytes() == (tree / "grid" / "elem.dat").read_bytes()


@pytest.mark.parametrize("kind", ["db", "dir"])
def test_rows_looked_up_together_serve_each_fetch(kind: str, db_url: str, tmp_path: Path) -> None:
    """store.look_up: one statement for many archives (crh_retrieve's results); a
    fetch given its row reads the same bytes without looking it up again."""
    root = tmp_path / "crq"
    root.mkdir()
    trees = [synth.make_tomodir(tmp_path / f"td{i}", "mod", nx=8, nz=4, seed=i) for i in range(2)]
    db = _db(db_url, root if kind == "dir" else None)
    with db.connect("test") as conn:
        shas = [store.put_tree(conn, db.store, t).sha256 for t in trees]
        rows = store.look_up(conn, [*shas, shas[0], "0" * 64])
        assert sorted(rows) == sorted(shas), "unknown archives are left out, repeated ones looked up once"
        for sha in shas:
            out = io.BytesIO()
            assert store.fetch(conn, db.store, sha, out, row=rows[sha]) == len(out.getvalue()) > 0
            assert out.getvalue() == _fetch(conn, db.store, sha)
            assert rows[sha][3] == kind


def test_directory_store_reads_archives_kept_in_the_database(db_url: str, tmp_path: Path) -> None:
    """Switching an installation to a directory store keeps the older archives readable."""
    tree = synth.make_tomodir(tmp_path / "td", "mod")
    with _db(db_url).connect("test") as conn:
        sha = store.put_tree(conn, store.DATABASE, tree).sha256
    (tmp_path / "crq").mkdir()
    db = _db(db_url, tmp_path / "crq")
    with db.connect("test") as conn:
        assert len(_fetch(conn, db.store, sha)) > 0


def test_corrupted_file_is_a_checksum_mismatch(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "crq"
    db = _directory_db(db_url, root)
    with db.connect("test") as conn:
        sha = _put(conn, db.store, tmp_path / "td")
        path = root / sha[:2] / f"{sha}.tar.zst"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(archive.ChecksumMismatch):
            _fetch(conn, db.store, sha)
        path.unlink()
        with pytest.raises(store.BlobMissing, match=str(path)):
            _fetch(conn, db.store, sha)
        root.rename(tmp_path / "unmounted")  # the mount goes away while the store is in use
        with pytest.raises(store.StoreUnavailable, match="not mounted"):
            _fetch(conn, db.store, sha)


def test_unreachable_directory_names_path_host_and_remedy(db_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    db = _db(db_url, missing)
    with db.connect("test") as conn:
        with pytest.raises(store.StoreUnavailable) as err:
            store.put_tree(conn, db.store, synth.make_tomodir(tmp_path / "td", "inv"))
    message = str(err.value)
    assert str(missing) in message and socket.gethostname() in message and "Mount" in message


def test_a_host_without_the_store_configured_is_told_so(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "crq").mkdir()
    db = _db(db_url, tmp_path / "crq")
    with db.connect("test") as conn:
        sha = store.put_tree(conn, db.store, synth.make_tomodir(tmp_path / "td", "inv")).sha256
    with _db(db_url).connect("test") as conn:
        with pytest.raises(store.StoreUnavailable, match=r"\[store\] path"):
            _fetch(conn, store.DATABASE, sha)


def test_store_path_from_the_config_is_checked_when_opening(tmp_path: Path, db_url: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\nurl = "{db_url}"\n[store]\npath = "{tmp_path / "nowhere"}"\n')
    settings = config.load(env={"CRH_CONFIG": str(cfg), "HOME": str(tmp_path)})
    with pytest.raises(DatabaseError, match="nowhere"):
        open_database(settings)
    (tmp_path / "nowhere").mkdir()
    db = open_database(settings)
    assert isinstance(db.store, store.DirectoryStore) and db.store.path == tmp_path / "nowhere"


@pytest.mark.parametrize("command", ["crh_add", "crh_worker"])
def test_an_unusable_store_directory_stops_a_command_before_any_job(
    command: str, tmp_path: Path, cli_env: dict[str, str], db_url: str
) -> None:
    """The store is resolved and checked when the command opens the database
    (cr_queue.database.open_database, store.configured): exit 2, the path and the remedy, no traceback, no job
    registered or claimed, no .crh written."""
    missing = tmp_path / "not-mounted"
    cfg = tmp_path / "crq.toml"
    cfg.write_text(f'[store]\npath = "{missing}"\n')
    env = {**cli_env, "CRH_CONFIG": str(cfg)}
    work = tmp_path / "work"
    synth.make_tree(work, n_mod=1, n_inv=1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        if command == "crh_worker":
            _queued(conn, "/data/waiting")
        before = conn.execute("SELECT id, status, attempt FROM inversions ORDER BY id").fetchall()
    proc = run([script(command), *(["-q"] if command == "crh_worker" else [])], env, cwd=work, check=2)
    assert str(missing) in proc.stderr and "Mount the shared directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT id, status, attempt FROM inversions ORDER BY id").fetchall() == before
    assert not list(work.rglob("*.crh"))


def test_pipeline_through_the_commands_with_a_directory_store(tmp_path: Path, cli_env: dict[str, str], db_url: str) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    cfg = tmp_path / "crq.toml"
    cfg.write_text(f'[store]\npath = "{root}"\n')
    env = {**cli_env, "CRH_CONFIG": str(cfg)}
    work = tmp_path / "work"
    synth.make_tree(work, n_mod=1, n_inv=1)
    run([script("crh_add")], env, cwd=work)
    run([script("crh_worker"), "-q"], env)
    run([script("crh_retrieve")], env, cwd=work)
    assert len(list(work.rglob("mod/volt.dat"))) == 2
    with psycopg.connect(db_url) as conn:
        locations = {r[0] for r in conn.execute("SELECT DISTINCT location FROM blobs")}
    assert locations == {"dir"}
    assert len(list(root.glob("*/*.tar.zst"))) == 4  # two inputs, two results


@pytest.mark.parametrize("kind", ["db", "dir"])
def test_crh_add_with_helper_processes_stores_and_queues_every_tomodir_in_order(
    kind: str, tmp_path: Path, cli_env: dict[str, str], db_url: str
) -> None:
    """Twelve tomodirs: on two or more CPUs crh_add forks a helper that packs
    part of them (packers.py); whoever packed it, each archive is stored whole
    under its hash, and the jobs are queued in the order the tomodirs were found."""
    root = tmp_path / "shared"
    root.mkdir()
    cfg = tmp_path / "crq.toml"
    cfg.write_text(f'[store]\npath = "{root}"\n' if kind == "dir" else "")
    env = {**cli_env, "CRH_CONFIG": str(cfg)}
    work = tmp_path / "work"
    tomodirs = [synth.make_tomodir(work / f"td_{i:02d}", "inv", nx=12, nz=6, seed=i) for i in range(12)]
    run([script("crh_add"), "--quiet"], env, cwd=work)
    with psycopg.connect(db_url) as conn:
        jobs = conn.execute("SELECT source_path, status, input_sha256 FROM inversions ORDER BY fair_rank, id").fetchall()
        locations = {r[0] for r in conn.execute("SELECT DISTINCT location FROM blobs")}
        db = _db(db_url, root if kind == "dir" else None)
        with db.connect("test") as reader:
            for td, (source, status, sha) in zip(tomodirs, jobs):
                assert (source, status) == (str(td), "queued")
                assert json.loads(td.with_suffix(".crh").read_text())["archive_sha256"] == sha
                out = io.BytesIO()
                store.fetch(reader, db.store, sha, out)  # verifies the hash
                assert sha == archive.pack(td, io.BytesIO()).sha256, "the same bytes as packing here"
    assert len(jobs) == 12 and locations == {kind}


# -------------------------------------------------------- garbage collection


def test_garbage_collection_keeps_what_jobs_use(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "crq"
    db = _directory_db(db_url, root)
    with db.connect("test") as conn:
        used = _put(conn, db.store, tmp_path / "a")
        unused = _put(conn, db.store, tmp_path / "b", seed=1)
        in_db = _put(conn, store.DATABASE, tmp_path / "c", seed=2)
        job_id = jobs.begin_registration(
            conn, jobs.NewJob("inv", False, "/a", "/a.crh", "u", "h"), ACTOR
        )
        jobs.finish_registration(conn, job_id, used, ACTOR)
        orphan = root / "ab" / ("ab" + "0" * 62 + ".tar.zst")
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"x")
        part = root / ".tmp-host-1-abc.part"
        part.write_bytes(b"y")
        old = time.time() - 7200
        for p in (orphan, part):
            os.utime(p, (old, old))

        young = store.collect_garbage(conn, db.store)  # everything is younger than an hour
        assert (young.blobs, young.orphan_files) == (0, 1)
        orphan.write_bytes(b"x")
        os.utime(orphan, (old, old))

        dry = store.collect_garbage(conn, db.store, min_age_s=0, stale_upload_s=3600, dry_run=True)
        assert dry.blobs == 2 and orphan.exists() and part.exists()

        report = store.collect_garbage(conn, db.store, min_age_s=0, stale_upload_s=3600)
        assert (report.blobs, report.orphan_files, report.temp_files) == (2, 1, 1)
        assert report.files == 3  # the unused archive's file, the orphan, the .part
        shas = {r[0] for r in conn.execute("SELECT sha256 FROM blobs")}
        assert shas == {used}
        assert (root / used[:2] / f"{used}.tar.zst").exists()
        assert not (root / unused[:2] / f"{unused}.tar.zst").exists()
        assert not orphan.exists() and not part.exists()
        assert in_db not in shas
        assert conn.execute("SELECT count(*) FROM binary_data").fetchone()[0] == 0


def test_abandoned_database_upload_is_collected(conn) -> None:
    writer = store.Upload(conn, store.DATABASE, chunk_size=10, batch_bytes=10)
    writer.write(b"0123456789abcdef")
    writer.flush()  # the first batch is in; the upload "dies" here
    conn.execute("UPDATE blobs SET datetime_created = now() - interval '2 days'")
    report = store.collect_garbage(conn, store.DATABASE)
    assert report.blobs == 1
    assert conn.execute("SELECT count(*) FROM binary_data").fetchone()[0] == 0


# ------------------------------------------------------------ tar headers


def _stat(mode: int, mtime_ns: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0, mtime_ns, 0))


def test_fast_headers_are_the_bytes_tarfile_writes() -> None:
    rng = random.Random(6)
    for _ in range(3000):
        rel = "/".join(
            "".join(rng.choice("abcxyz_.-0123") for _ in range(rng.randint(1, 24))) for _ in range(rng.randint(1, 4))
        )[:99]
        kind = rng.choice([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
        mtime_ns = rng.choice([0, 10**9, rng.randint(0, 2**33) * 10**9, rng.randint(0, 2**33 * 10**9)])
        mode = rng.choice([0o644, 0o755, 0o600, 0o4755, 0o1777])
        st = _stat(mode | (0o040000 if kind == tarfile.DIRTYPE else 0o100000), mtime_ns)
        size = rng.randint(0, 2**33) if kind == tarfile.REGTYPE else 0
        link = rel[::-1] if kind == tarfile.SYMTYPE else ""
        fast = headers.header(rel, st, kind, size=size, link=link)
        slow = headers.tarfile_header(rel, st, kind, size=size, link=link)
        assert fast == slow, (rel, kind, mtime_ns, mode)
    # What the fast path does not cover goes to tarfile.
    st = _stat(0o100644, 123)
    for rel in ("x" * 150, "grüße.dat"):
        assert headers.header(rel, st, tarfile.REGTYPE, size=1) == headers.tarfile_header(rel, st, tarfile.REGTYPE, size=1)


def test_prepared_statements_on_the_hot_path(conn) -> None:
    """psycopg prepares a statement on its 6th execution on a connection: the claim is one."""
    for i in range(8):
        _queued(conn, f"/p{i}")
    actor = _worker(conn)
    for _ in range(7):
        assert jobs.claim(conn, actor=actor, can_mod=True, can_inv=True, lease_s=60) is not None
    prepared = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
    # The claim is a call of crh_claim (migration 0005), whose own plan PL/pgSQL caches.
    assert any("crh_claim(" in row[0] for row in prepared)
