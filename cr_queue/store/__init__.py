"""Archive stores: where packed tomodirs live, content addressed by their sha256.

Two stores, chosen per installation:

* the **database** (default): chunks in ``binary_data``, one service to run
  and back up;
* a **shared directory** (``[store] path = /users/data/crq`` in the config):
  ``<path>/<sha[:2]>/<sha>.tar.zst``, for groups whose database should not
  hold terabytes.  The database still has a ``blobs`` row per archive
  (``location = 'dir'``), so jobs keep their foreign keys and every admin
  query still sees sizes.

Either way an archive is written while it is being produced (tar → zstd →
sha256 run in the caller, see :func:`archive.pack`), so its hash is known only
at the end, and every reader verifies the hash before anyone unpacks.

Call sites stay one line: ``store.put_tree(conn, root)`` and
``store.fetch(conn, sha256, fileobj)`` use the store bound to the connection
(``Database.connect`` binds the installation's store); a connection nobody
bound uses the database store.  Reading follows the ``blobs`` row, so
archives written before a directory store was configured stay readable.

Durability: upload transactions commit with ``synchronous_commit = off``.
Nothing refers to an archive until a later synchronous commit of the caller
(``finish_registration``, ``complete``) names it, and PostgreSQL's WAL is
sequential: that commit makes the upload durable too.  This saves two of the
three WAL flushes an upload used to cost (see docs/performance.md).
"""

from __future__ import annotations

import errno
import functools
import os
import queue as _queue
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import psycopg
from psycopg import errors, pq

from cr_queue.tomodir import archive

# Measured with bench/tune_store.py (docs/performance.md): 1 MiB chunks, 4 MiB
# per COPY transaction, and two batches in flight between packing and COPY.
CHUNK_SIZE = 1 << 20
BATCH_BYTES = 4 << 20
PIPELINE_DEPTH = 2
READ_BATCH = 8

LOCATIONS = ("db", "dir")

_NEW_BLOB = "INSERT INTO blobs (location) VALUES ('db') RETURNING id"
_ASYNC = "SET LOCAL synchronous_commit = off"
_COPY_CHUNKS = "COPY binary_data (blob_id, chunk_no, data) FROM STDIN (FORMAT BINARY)"
_EXISTING = "SELECT id FROM blobs WHERE sha256 = %s AND complete"
_SEAL = (
    "UPDATE blobs SET sha256 = %s, size = %s, raw_size = %s, n_chunks = %s, complete = true, "
    "datetime_completed = now() WHERE id = %s"
)
_DROP = "DELETE FROM blobs WHERE id = %s"
# A small archive's whole upload: the blob row unless the content is stored already
# (and the transaction's commit not waiting for the disk), its chunks, its seal.
_UNLESS_STORED = (
    "FROM (SELECT set_config('synchronous_commit', 'off', true)) s "
    "WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE sha256 = %s AND complete) RETURNING id"
)
_NEW_BLOB_UNLESS_STORED = f"INSERT INTO blobs (location) SELECT 'db' {_UNLESS_STORED}"
_NEW_FILE_BLOB_UNLESS_STORED = f"INSERT INTO blobs (location) SELECT 'dir' {_UNLESS_STORED}"
_LOOKUP = "SELECT id, n_chunks, size, location FROM blobs WHERE sha256 = %s AND complete"
_LOOKUP_MANY = "SELECT sha256, id, n_chunks, size, location FROM blobs WHERE sha256 = ANY(%s) AND complete"
# Through the view: it shows only chunks of blobs the caller may see (row-level security).
_READ = (
    "SELECT chunk_no, data FROM blob_chunks WHERE blob_id = %s AND chunk_no >= %s "
    "ORDER BY chunk_no LIMIT %s"
)
# Our upload's bytes equal a stored copy we may not see: the database checks and shares it.
_ADOPT = "SELECT crh_adopt_blob(%s, %s)"
_HAS = "SELECT EXISTS (SELECT 1 FROM blobs WHERE sha256 = %s AND complete)"
_NEW_FILE_BLOB = "INSERT INTO blobs (location) VALUES ('dir') RETURNING id"
# Many archives at once (crh_add's helpers deliver them faster than one transaction
# each stores them): a blobs row for each sha256 not stored yet, the commit not
# waiting for the disk; the ids come with their sha256 (taken from the sequence in
# a CTE, which runs once, so both uses see the same ids).
_NEW_BLOBS_UNLESS_STORED = """
WITH want AS MATERIALIZED (
    SELECT s.sha256, nextval(pg_get_serial_sequence('blobs', 'id')) AS id
    FROM unnest(%(shas)s::text[]) WITH ORDINALITY AS s(sha256, ord),
         (SELECT set_config('synchronous_commit', 'off', true)) c
    WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.sha256 = s.sha256 AND b.complete)
    ORDER BY s.ord
), made AS (
    INSERT INTO blobs (id, location) SELECT id, %(location)s FROM want
)
SELECT sha256, id FROM want
"""
_SEAL_MANY = """
UPDATE blobs b SET sha256 = u.sha256, size = u.size, raw_size = u.raw_size, n_chunks = u.n_chunks,
       complete = true, datetime_completed = now()
FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s::int[]) AS u(id, sha256, size, raw_size, n_chunks)
WHERE b.id = u.id
"""


# Writes an archive to the file object it is given and describes it.
Produce = Callable[[archive.Writable], archive.PackResult]
# An archive already in memory: its bytes (in pieces) and what packing it found.
Packed = tuple[list[bytes], archive.PackResult]


class BlobMissing(Exception):
    """An archive a job refers to is not (or no longer) stored."""


class StoreUnavailable(OSError):
    """This host cannot use the shared-directory store; the message says which, where and what to do."""


class Store(Protocol):
    kind: str

    def put_tree(self, conn: psycopg.Connection, root, *, members=None) -> archive.PackResult: ...

    def put_stream(self, conn: psycopg.Connection, produce: Produce) -> archive.PackResult: ...

    def put_many(self, conn: psycopg.Connection, packed: list[Packed]) -> None: ...

    def fetch(self, conn: psycopg.Connection, sha256: str, dst: BinaryIO) -> int: ...


# ----------------------------------------------------------------- binding

_bound: weakref.WeakKeyDictionary[psycopg.Connection, Store] = weakref.WeakKeyDictionary()


def bind(conn: psycopg.Connection, chosen: Store) -> psycopg.Connection:
    """Make ``chosen`` the store of everything done through ``conn``."""
    _bound[conn] = chosen
    return conn


def of(conn: psycopg.Connection) -> Store:
    return _bound.get(conn) or DATABASE


def from_settings(raw: dict, *, source: str = "the config") -> Store:
    """The store an installation configured: ``[store] path`` or the database."""
    table = raw.get("store") if isinstance(raw, dict) else None
    path = table.get("path") if isinstance(table, dict) else None
    if path is None:
        return DATABASE
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"[store] path in {source} must be a non-empty string (a directory every host can see)")
    return DirectoryStore(Path(os.path.expanduser(path)), source=source)


# --------------------------------------------------------- database store


class BlobWriter:
    """A write-only file object that lands in ``binary_data``; use with :func:`archive.pack`.

    Full batches are handed to a thread that COPYs them while the caller
    packs the next ones (a bounded queue: at most ``PIPELINE_DEPTH`` batches
    wait).  An archive smaller than one batch never starts the thread and is
    stored in a single transaction at :meth:`seal`.  The connection belongs
    to the writer until :meth:`seal` or :meth:`abort` returns.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        *,
        chunk_size: int = CHUNK_SIZE,
        batch_bytes: int = BATCH_BYTES,
        depth: int = PIPELINE_DEPTH,
    ) -> None:
        self._conn = conn
        self._chunk_size = chunk_size
        self._batch_bytes = batch_bytes
        self._depth = depth
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._n_chunks = 0
        self._queue: _queue.Queue[list[bytes] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.size = 0
        self.blob_id: int | None = None

    def write(self, data) -> int:
        n = len(data)
        self._buf += data
        self.size += n
        while len(self._buf) >= self._chunk_size:
            self._pending.append(bytes(self._buf[: self._chunk_size]))
            del self._buf[: self._chunk_size]
            self._pending_bytes += self._chunk_size
            if self._pending_bytes >= self._batch_bytes:
                self._submit()
        return n

    # -- the COPY thread

    def _submit(self) -> None:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if self._error is not None:
            raise self._error
        if self._depth == 0:  # no thread: COPY here (bench/tune.py compares)
            with self._conn.transaction():
                self._conn.execute(_ASYNC)
                self._copy(batch)
            return
        if self._thread is None:
            self._queue = _queue.Queue(maxsize=self._depth)
            self._thread = threading.Thread(target=self._upload, name="blob-copy", daemon=True)
            self._thread.start()
        self._queue.put(batch)
        if self._error is not None:
            raise self._error

    def _upload(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain so the producer never blocks
            try:
                with self._conn.transaction():
                    self._conn.execute(_ASYNC)
                    self._copy(batch)
            except BaseException as exc:  # handed to the producer
                self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def _copy(self, batch: list[bytes]) -> None:
        if self.blob_id is None:
            self.blob_id = self._conn.execute(_NEW_BLOB).fetchone()[0]
        if not batch:
            return
        with self._conn.cursor() as cur, cur.copy(_COPY_CHUNKS) as copy:
            copy.set_types(["int8", "int4", "bytea"])
            for chunk in batch:
                copy.write_row((self.blob_id, self._n_chunks, chunk))
                self._n_chunks += 1

    # -- finishing

    def seal(self, sha256: str, raw_size: int | None = None) -> str:
        """Store the last chunks and name the blob by its hash (or reuse an identical one), in one transaction."""
        self._join()
        if self._buf:
            self._pending.append(bytes(self._buf))
            self._buf.clear()
        batch, self._pending = self._pending, []
        if self.blob_id is None:
            try:
                return self._seal_small(batch, sha256, raw_size)
            except errors.UniqueViolation:
                # Rolled back: the same content was sealed meanwhile, or is hidden from us.
                self.blob_id, self._n_chunks = None, 0
        with self._conn.transaction():
            self._conn.execute(_ASYNC)
            if self._conn.execute(_EXISTING, (sha256,)).fetchone() is not None:
                if self.blob_id is not None:
                    self._conn.execute(_DROP, (self.blob_id,))
                return sha256
            self._copy(batch)
            try:
                with self._conn.transaction():
                    self._conn.execute(_SEAL, (sha256, self.size, raw_size, self._n_chunks, self.blob_id))
            except errors.UniqueViolation:
                # Someone sealed the same content in the meantime (or another user's copy is
                # hidden from us): theirs is as good as ours once the database has compared them.
                self._conn.execute(_ADOPT, (self.blob_id, sha256))
                self._conn.execute(_DROP, (self.blob_id,))
        return sha256

    def _seal_small(self, batch: list[bytes], sha256: str, raw_size: int | None) -> str:
        """An archive that never filled a batch, in one transaction of four round trips
        instead of eight (most tomodirs are this small; COPY, measured, beats an
        INSERT of a bytea array for the chunks).  A unique violation
        on the seal rolls it all back; :meth:`seal` then takes the careful path, which
        keeps the upload to compare it with the stored copy."""
        conn = self._conn
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            with conn.transaction():  # inside the caller's transaction: a savepoint
                row = conn.execute(_NEW_BLOB_UNLESS_STORED, (sha256,)).fetchone()
                if row is not None:
                    self.blob_id = row[0]
                    self._copy(batch)
                    conn.execute(_SEAL, (sha256, self.size, raw_size, self._n_chunks, self.blob_id))
            return sha256
        # Three round trips, not five: BEGIN goes with the INSERT and COMMIT with the
        # seal, in pipeline mode (COPY cannot be pipelined, so it runs between).
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                row = conn.execute(_NEW_BLOB_UNLESS_STORED, (sha256,)).fetchone()
            if row is None:
                conn.execute("COMMIT")
                return sha256
            self.blob_id = row[0]
            self._copy(batch)
            with conn.pipeline():
                conn.execute(_SEAL, (sha256, self.size, raw_size, self._n_chunks, self.blob_id))
                conn.execute("COMMIT")
        except BaseException:
            if not conn.closed and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
            raise
        return sha256

    def abort(self) -> None:
        try:
            self._join()
        except BaseException:
            pass
        if self.blob_id is not None and not self._conn.closed:
            self._conn.execute(_DROP, (self.blob_id,))


class DatabaseStore:
    """Archives as 1 MiB chunks in ``binary_data``."""

    kind = "db"

    def describe(self) -> str:
        return "the database (binary_data)"

    def put_tree(self, conn: psycopg.Connection, root, *, members=None, chunk_size: int = CHUNK_SIZE) -> archive.PackResult:
        """Pack a directory straight into the database in one streaming pass."""
        return self.put_stream(conn, lambda out: archive.pack(root, out, members=members), chunk_size=chunk_size)

    def put_stream(self, conn: psycopg.Connection, produce: Produce, *, chunk_size: int = CHUNK_SIZE) -> archive.PackResult:
        """Store the archive that ``produce`` writes (and describes in the PackResult it returns)."""
        writer = BlobWriter(conn, chunk_size=chunk_size)
        try:
            result = produce(writer)
        except BaseException:
            try:
                writer.abort()
            except psycopg.Error:
                pass
            raise
        writer.seal(result.sha256, result.raw_size)
        return result

    def put_many(self, conn: psycopg.Connection, packed: list[Packed], *, chunk_size: int = CHUNK_SIZE) -> None:
        """Store archives already in memory in one transaction of five round trips in all
        (one each cost five: measured, it halves the client's and the server's work
        per archive).  If any of them turns out to be stored meanwhile, or hidden from
        us (a unique violation), it is all rolled back and each takes :meth:`put_stream`'s
        careful path."""
        distinct = _distinct(packed)
        try:
            with conn.transaction():
                ids = _new_blobs(conn, distinct, "db")
                if ids:
                    n_chunks = {}
                    with conn.cursor() as cur, cur.copy(_COPY_CHUNKS) as copy:
                        copy.set_types(["int8", "int4", "bytea"])
                        for sha, blob_id in ids.items():
                            n = 0
                            for n, chunk in enumerate(_rechunk(distinct[sha][0], chunk_size), 1):
                                copy.write_row((blob_id, n - 1, chunk))
                            n_chunks[sha] = n
                    _seal_many(conn, ids, distinct, n_chunks)
            return
        except errors.UniqueViolation:
            pass
        for pieces, result in distinct.values():
            self.put_stream(conn, functools.partial(_replay, pieces, result), chunk_size=chunk_size)

    def fetch(self, conn: psycopg.Connection, sha256: str, dst: BinaryIO, *, row: tuple | None = None) -> int:
        """``row``: the blob's ``_LOOKUP`` row where the caller has it (one round trip fewer)."""
        return archive.copy_verified(chunks(conn, sha256, row=row), dst, sha256)


DATABASE = DatabaseStore()


# -------------------------------------------------------- directory store


@dataclass
class DirectoryStore:
    """Archives as files ``<path>/<sha[:2]>/<sha>.tar.zst`` in a directory every host mounts.

    A file is written under a temporary name in the store's top directory
    (the same filesystem, so the rename is atomic), fsynced, renamed into
    place and its directory fsynced: a reader sees a whole archive or none.
    """

    path: Path
    source: str = "the config"
    kind: str = field(default="dir", init=False)
    _checked: set[str] = field(default_factory=set, init=False, repr=False)

    def describe(self) -> str:
        return f"the directory {self.path}"

    def file_of(self, sha256: str) -> Path:
        return self.path / sha256[:2] / f"{sha256}.tar.zst"

    def check(self, *, write: bool = False) -> None:
        """Raise StoreUnavailable unless this host can read (and with write=True, write) the store."""
        mode = "write" if write else "read"
        if mode in self._checked:
            return
        need = os.R_OK | os.X_OK | (os.W_OK if write else 0)
        problem = None
        try:
            if not self.path.is_dir():
                problem = "it does not exist or is not a directory (not mounted here?)"
            elif not os.access(self.path, need):
                problem = f"this user ({_user()}) may not {mode} it"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem is not None:
            raise StoreUnavailable(
                errno.EACCES if "may not" in problem else errno.ENOENT,
                f"the archive store {self.path} ([store] path in {self.source}) cannot be used on host "
                f"{socket.gethostname()}: {problem}. Mount the shared directory on this host at the same path "
                f"and give the cr_queue users {'read and write' if write else 'read'} access to it, "
                "or remove [store] path from the config to keep archives in the database",
            )
        self._checked.add(mode)

    def put_tree(self, conn: psycopg.Connection, root, *, members=None, chunk_size: int = CHUNK_SIZE) -> archive.PackResult:
        return self.put_stream(conn, lambda out: archive.pack(root, out, members=members))

    def put_stream(self, conn: psycopg.Connection, produce: Produce, *, chunk_size: int = CHUNK_SIZE) -> archive.PackResult:
        """Store the archive that ``produce`` writes (and describes in the PackResult it returns)."""
        result = self._write_file(produce)
        self._register(conn, result)
        return result

    def put_many(self, conn: psycopg.Connection, packed: list[Packed], *, chunk_size: int = CHUNK_SIZE) -> None:
        """Write archives already in memory, then their blobs rows in one transaction
        (on a unique violation each row takes :meth:`_register`'s careful path)."""
        distinct = _distinct(packed)
        for pieces, result in distinct.values():
            self._write_file(functools.partial(_replay, pieces, result))
        try:
            with conn.transaction():
                ids = _new_blobs(conn, distinct, "dir")
                if ids:
                    _seal_many(conn, ids, distinct, dict.fromkeys(ids, 0))
            return
        except errors.UniqueViolation:
            pass
        for _pieces, result in distinct.values():
            self._register(conn, result)

    def _write_file(self, produce: Produce) -> archive.PackResult:
        """The archive's file, whole or not at all: a temporary name, fsync, rename, fsync of its directory."""
        self.check(write=True)
        tmp = self.path / f".tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(
                exc.errno, f"cannot write to the archive store {self.path} on host {socket.gethostname()}: "
                f"{exc.strerror}; check that it is mounted read-write and has space"
            ) from exc
        try:
            with open(fd, "wb", buffering=0, closefd=True) as fh:
                result = produce(fh)
                os.fsync(fh.fileno())
            final = self.file_of(result.sha256)
            final.parent.mkdir(exist_ok=True)
            if final.exists() and final.stat().st_size == result.size:
                tmp.unlink()  # the same content is already stored
            else:
                os.replace(tmp, final)
                _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return result

    @staticmethod
    def _register(conn: psycopg.Connection, result: archive.PackResult) -> None:
        """The archive's blobs row: made unsealed, then sealed, as row security requires.

        First in two statements (the usual case: nobody stored these bytes); on a
        unique violation that transaction is rolled back and the careful one runs."""
        try:
            with conn.transaction():
                row = conn.execute(_NEW_FILE_BLOB_UNLESS_STORED, (result.sha256,)).fetchone()
                if row is not None:
                    conn.execute(_SEAL, (result.sha256, result.size, result.raw_size, 0, row[0]))
            return
        except errors.UniqueViolation:
            pass
        with conn.transaction():
            conn.execute(_ASYNC)
            if conn.execute(_EXISTING, (result.sha256,)).fetchone() is not None:
                return
            blob_id = conn.execute(_NEW_FILE_BLOB).fetchone()[0]
            try:
                with conn.transaction():
                    conn.execute(_SEAL, (result.sha256, result.size, result.raw_size, 0, blob_id))
            except errors.UniqueViolation:
                # Stored already (perhaps by another user, hidden from us): the file is the same bytes.
                conn.execute(_DROP, (blob_id,))

    def fetch(self, conn: psycopg.Connection, sha256: str, dst: BinaryIO, *, row: tuple | None = None) -> int:
        # The row decides, as for the database store: what the caller may not see there
        # (row-level security) it does not get here either.
        row = _blob_row(conn, sha256, row)
        if row[3] == "db":
            return DATABASE.fetch(conn, sha256, dst, row=row)
        return self.fetch_file(sha256, dst)

    def fetch_file(self, sha256: str, dst: BinaryIO) -> int:
        self.check()
        path = self.file_of(sha256)
        try:
            fh = open(path, "rb", buffering=0)
        except FileNotFoundError:
            if not self.path.is_dir():  # the mount went away: this host's problem, not the job's
                self._checked.clear()
                self.check()
            raise BlobMissing(f"archive {sha256[:12]} is not in the store: {path} does not exist") from None
        with fh:
            return archive.copy_verified(iter(lambda: fh.read(CHUNK_SIZE), b""), dst, sha256)


def _distinct(packed: list[Packed]) -> dict[str, Packed]:
    """One archive per sha256 (two tomodirs with the same content share it)."""
    distinct: dict[str, Packed] = {}
    for pieces, result in packed:
        distinct.setdefault(result.sha256, (pieces, result))
    return distinct


def _new_blobs(conn: psycopg.Connection, distinct: dict[str, Packed], location: str) -> dict[str, int]:
    """Unsealed blobs rows for those of ``distinct`` not stored yet: sha256 -> id."""
    rows = conn.execute(_NEW_BLOBS_UNLESS_STORED, {"shas": list(distinct), "location": location}).fetchall()
    return dict(rows)


def _seal_many(conn: psycopg.Connection, ids: dict[str, int], distinct: dict[str, Packed], n_chunks: dict[str, int]) -> None:
    results = [distinct[sha][1] for sha in ids]
    conn.execute(
        _SEAL_MANY,
        (list(ids.values()), list(ids), [r.size for r in results], [r.raw_size for r in results], [n_chunks[sha] for sha in ids]),
    )


def _rechunk(pieces: list[bytes], size: int) -> Iterator[bytes]:
    """The bytes of ``pieces`` again, cut into ``size``-byte chunks (the last one shorter)."""
    buf = bytearray()
    for piece in pieces:
        if not buf and len(piece) == size:
            yield piece
            continue
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def _replay(pieces: list[bytes], result: archive.PackResult, out: archive.Writable) -> archive.PackResult:
    """A :data:`Produce` for an archive in memory."""
    for piece in pieces:
        out.write(piece)
    return result


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - only for a message
        return str(os.getuid())


# -------------------------------------------------------------- call sites


def put_tree(conn: psycopg.Connection, root, *, members=None, chunk_size: int = CHUNK_SIZE) -> archive.PackResult:
    """Pack a directory into the connection's store in one streaming pass."""
    return of(conn).put_tree(conn, root, members=members, chunk_size=chunk_size)


def put_stream(conn: psycopg.Connection, produce: Produce) -> archive.PackResult:
    """Store an archive packed elsewhere (crh_add's helper processes, see packers.py):
    ``produce(out)`` writes it to ``out`` and returns its PackResult."""
    return of(conn).put_stream(conn, produce)


def put_many(conn: psycopg.Connection, packed: list[Packed]) -> None:
    """Store archives already in memory (crh_add's helpers deliver them whole) together:
    far fewer round trips than one :func:`put_stream` each."""
    of(conn).put_many(conn, packed)


def exists(conn: psycopg.Connection, sha256: str) -> bool:
    return bool(conn.execute(_HAS, (sha256,)).fetchone()[0])


def _blob_row(conn: psycopg.Connection, sha256: str, row: tuple | None) -> tuple:
    """The archive's ``_LOOKUP`` row: the caller's, or looked up now; BlobMissing without one."""
    if row is None:
        row = conn.execute(_LOOKUP, (sha256,)).fetchone()
    if row is None:
        raise BlobMissing(f"archive {sha256[:12]} is not in the store")
    return row


def chunks(conn: psycopg.Connection, sha256: str, *, row: tuple | None = None) -> Iterator[bytes]:
    """Yield a database blob's chunks in order, a few at a time, in short statements
    (``row``: its ``_LOOKUP`` row, if the caller has looked it up already)."""
    row = _blob_row(conn, sha256, row)
    blob_id, n_chunks, _size, location = row
    if location != "db":
        raise BlobMissing(f"archive {sha256[:12]} is kept in a directory store, not in the database")
    next_no = 0
    while next_no < n_chunks:
        rows = conn.execute(_READ, (blob_id, next_no, READ_BATCH), binary=True).fetchall()
        if not rows:
            break
        for chunk_no, data in rows:
            if chunk_no != next_no:
                raise BlobMissing(f"archive {sha256[:12]} lacks chunk {next_no}")
            yield data
            next_no += 1
    if next_no != n_chunks:
        raise BlobMissing(f"archive {sha256[:12]} lacks chunk {next_no}")


def look_up(conn: psycopg.Connection, shas: Iterable[str]) -> dict[str, tuple]:
    """Many archives' rows in one statement, for :func:`fetch` (those the caller may see)."""
    return {sha: tuple(rest) for sha, *rest in conn.execute(_LOOKUP_MANY, (sorted(set(shas)),)).fetchall()}


def fetch(conn: psycopg.Connection, sha256: str, dst: BinaryIO, *, row: tuple | None = None) -> int:
    """Copy an archive into a file, verifying its sha256 before anyone may unpack it.

    Where the bytes are is the ``blobs`` row's business: an archive in a
    directory store needs this host to have the store configured.  ``row``:
    the archive's row from :func:`look_up` where the caller has it (one round
    trip fewer)."""
    chosen = of(conn)
    if isinstance(chosen, DirectoryStore):
        return chosen.fetch(conn, sha256, dst, row=row)
    row = _blob_row(conn, sha256, row)
    if row[3] == "dir":
        raise StoreUnavailable(
            errno.ENOENT,
            f"archive {sha256[:12]} is kept in a shared-directory store, but host {socket.gethostname()} has "
            "no [store] path configured; set [store] path in the config (the same directory the other "
            "hosts use) and make sure it is mounted here",
        )
    return DATABASE.fetch(conn, sha256, dst, row=row)


# --------------------------------------------------------- garbage collection


@dataclass
class GarbageReport:
    blobs: int = 0  # blob rows removed (database chunks went with them)
    bytes: int = 0  # compressed bytes freed, both stores
    files: int = 0  # files removed from the directory store
    orphan_files: int = 0  # of those, files no row knew about
    temp_files: int = 0  # abandoned uploads (.part) removed
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)


_GARBAGE = """
SELECT b.id, b.sha256, b.size, b.location FROM blobs b
WHERE (b.complete AND b.datetime_completed < now() - make_interval(secs => %(age)s)
       AND NOT EXISTS (SELECT 1 FROM inversions j WHERE j.input_sha256 = b.sha256)
       AND NOT EXISTS (SELECT 1 FROM inversions j WHERE j.result_sha256 = b.sha256))
   OR (NOT b.complete AND b.datetime_created < now() - make_interval(secs => %(stale)s))
ORDER BY b.id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
_DELETE_UNREFERENCED = """
DELETE FROM blobs b WHERE b.id = ANY(%(ids)s)
  AND NOT EXISTS (SELECT 1 FROM inversions j WHERE j.input_sha256 = b.sha256)
  AND NOT EXISTS (SELECT 1 FROM inversions j WHERE j.result_sha256 = b.sha256)
RETURNING b.id, b.sha256, b.size, b.location
"""
_KNOWN = "SELECT sha256 FROM blobs WHERE sha256 = ANY(%s)"


def collect_garbage(
    conn: psycopg.Connection,
    directory: DirectoryStore | Path | str | None = None,
    *,
    min_age_s: float = 3600.0,
    stale_upload_s: float = 86400.0,
    dry_run: bool = False,
    batch: int = 1000,
) -> GarbageReport:
    """Delete archives no job refers to any more, from both stores.

    * complete archives referenced by no job (input or result) and older than
      ``min_age_s`` (an archive is unreferenced for a moment between its
      upload and the statement that names it);
    * incomplete uploads older than ``stale_upload_s`` (an interrupted
      crh_add or worker);
    * in the directory store, if given (default: the connection's store when
      it is one): files of those archives, files no ``blobs`` row knows
      (older than ``min_age_s``), and abandoned ``.part`` files older than
      ``stale_upload_s``.

    Rows are deleted in batches of ``batch``, each one short transaction, and
    a file only after its row is gone, so a reader never finds a row whose
    file was removed.  Returns what was (or with ``dry_run`` would be) removed.
    """
    if directory is None and isinstance(of(conn), DirectoryStore):
        directory = of(conn)
    if directory is not None and not isinstance(directory, DirectoryStore):
        directory = DirectoryStore(Path(directory))
    report = GarbageReport(dry_run=dry_run)
    params = {"age": min_age_s, "stale": stale_upload_s, "limit": batch}
    last_ids: list[int] = []
    while True:
        with conn.transaction():
            rows = conn.execute(_GARBAGE, params).fetchall()
            ids = [r[0] for r in rows]
            if not rows or ids == last_ids:
                break
            if dry_run:
                gone = rows
            else:
                gone = conn.execute(_DELETE_UNREFERENCED, {"ids": ids}).fetchall()
        for _id, sha, size, location in gone:
            report.blobs += 1
            report.bytes += size or 0
            if location == "dir" and directory is not None and sha:
                _remove_file(directory.file_of(sha), report, dry_run)
        if dry_run or len(rows) < batch:
            break
        last_ids = ids
    if directory is not None:
        _sweep_directory(conn, directory, report, min_age_s, stale_upload_s, dry_run)
    return report


def _remove_file(path: Path, report: GarbageReport, dry_run: bool) -> None:
    try:
        if not dry_run:
            path.unlink()
        report.files += 1
    except FileNotFoundError:
        pass
    except OSError as exc:
        report.errors.append(f"cannot remove {path}: {exc.strerror or exc}")


def _sweep_directory(
    conn: psycopg.Connection, directory: DirectoryStore, report: GarbageReport, min_age_s: float, stale_s: float, dry_run: bool
) -> None:
    directory.check(write=not dry_run)
    now = time.time()
    for entry in os.scandir(directory.path):
        if entry.name.endswith(".part") and entry.is_file(follow_symlinks=False):
            if now - entry.stat(follow_symlinks=False).st_mtime > stale_s:
                _remove_file(Path(entry.path), report, dry_run)
                report.temp_files += 1
            continue
        if len(entry.name) != 2 or not entry.is_dir(follow_symlinks=False):
            continue
        candidates: dict[str, tuple[Path, int]] = {}
        for f in os.scandir(entry.path):
            if not f.name.endswith(".tar.zst") or not f.is_file(follow_symlinks=False):
                continue
            st = f.stat(follow_symlinks=False)
            if now - st.st_mtime > min_age_s:
                candidates[f.name[: -len(".tar.zst")]] = (Path(f.path), st.st_size)
        if not candidates:
            continue
        known = {r[0] for r in conn.execute(_KNOWN, (list(candidates),))}
        for sha, (path, size) in candidates.items():
            if sha not in known:
                _remove_file(path, report, dry_run)
                report.orphan_files += 1
                report.bytes += size
