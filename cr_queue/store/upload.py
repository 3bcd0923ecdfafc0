"""The one way an archive gets into a store, wherever its bytes go.

Every upload has two parts, whatever the store's location:

1. **the bytes**: written while the archive is produced (tar -> zstd ->
   sha256 run in the caller, see :func:`archive.pack`), so its hash is
   known only at the end.  The database store cuts them into chunks and
   COPYs full batches into ``binary_data`` from a thread while the caller
   packs the next ones (a row is made for them first, unsealed); the
   directory store writes a file and renames it into place
   (:class:`directory.ArchiveFile`).  Archives already in memory (crh_add's
   helpers deliver them whole) skip this part: their chunks go into the
   sealing transaction.
2. **the seal** (:func:`_seal`), the same for both locations and for one
   archive or a batch: one transaction makes a row for each archive whose
   content is not stored yet (the duplicate is found in that statement),
   COPYs whatever chunks are still in memory, and names the rows by their
   hash.  BEGIN travels with the first statement and COMMIT with the last
   (pipeline mode), and the commit does not wait for the disk.  A unique
   violation (the same content sealed meanwhile, or another user's copy
   hidden by row security) rolls it back, and each archive takes the
   careful path: it compares and shares (database store) or drops its row.

Durability: upload transactions commit with ``synchronous_commit = off``
(``begin`` in blobs.sql says why that is safe).
"""

from __future__ import annotations

import queue as _queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import errors, pq

from cr_queue.queries import blobs
from cr_queue.store.choice import Store
from cr_queue.store.directory import ArchiveFile, DirectoryStore
from cr_queue.tomodir import archive

# Measured with bench/tune.py (docs/performance.md): 1 MiB chunks, 4 MiB
# per COPY transaction, and two batches in flight between packing and COPY.
CHUNK_SIZE = 1 << 20
BATCH_BYTES = 4 << 20
PIPELINE_DEPTH = 2

# Writes an archive to the file object it is given and describes it.
Produce = Callable[[archive.Writable], archive.PackResult]
# An archive already in memory: its bytes (in pieces) and what packing it found.
Packed = tuple[list[bytes], archive.PackResult]


# ------------------------------------------------------------- call sites


def put_tree(conn: psycopg.Connection, where: Store, root, *, members=None, chunk_size: int | None = None) -> archive.PackResult:
    """Pack a directory into the store ``where`` in one streaming pass."""
    return put_stream(conn, where, lambda out: archive.pack(root, out, members=members), chunk_size=chunk_size)


def put_stream(conn: psycopg.Connection, where: Store, produce: Produce, *, chunk_size: int | None = None) -> archive.PackResult:
    """Store the archive that ``produce(out)`` writes to ``out`` (and describes in the PackResult it returns)."""
    upload = Upload(conn, where, chunk_size=chunk_size)
    try:
        result = produce(upload)
    except BaseException:
        try:
            upload.abort()
        except psycopg.Error:
            pass
        raise
    upload.seal(result.sha256, result.raw_size)
    return result


def put_many(conn: psycopg.Connection, where: Store, packed: list[Packed], *, chunk_size: int | None = None) -> None:
    """Store archives already in memory together (crh_add's helpers deliver them whole):
    one sealing transaction of two round trips and a COPY for the whole batch
    instead of one each (measured: it halves the client's and the server's work
    per archive).  Two with the same content are stored once."""
    size = chunk_size or CHUNK_SIZE
    written = []
    for pieces, result in _distinct(packed).values():
        if isinstance(where, DirectoryStore):
            file = where.new_file()
            try:
                for piece in pieces:
                    file.write(piece)
            except BaseException:
                file.discard()
                raise
            file.place(result.sha256, result.size)
            pieces = []
        written.append(_Written(result.sha256, result.size, result.raw_size, pieces))
    _seal(conn, where.location, written, size)


# ----------------------------------------------------------------- the bytes


class Upload:
    """A write-only file object that lands in the store ``where``; use with :func:`archive.pack`,
    then :meth:`seal` (or :meth:`abort`).  The connection belongs to the upload until then."""

    def __init__(
        self,
        conn: psycopg.Connection,
        where: Store,
        *,
        chunk_size: int | None = None,
        batch_bytes: int | None = None,
        depth: int | None = None,
    ) -> None:
        self._conn = conn
        self._location = where.location
        self._chunk_size = chunk_size or CHUNK_SIZE
        self.size = 0
        self._file: ArchiveFile | None = None
        self._chunks: _Chunks | None = None
        if isinstance(where, DirectoryStore):
            self._file = where.new_file()
        else:
            batch_bytes = BATCH_BYTES if batch_bytes is None else batch_bytes
            self._chunks = _Chunks(conn, self._chunk_size, batch_bytes, PIPELINE_DEPTH if depth is None else depth)

    def write(self, data) -> int:
        n = len(data)
        if self._file is not None:
            self._file.write(data)
        else:
            self._chunks.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        """Wait until every full batch is in the database (database store)."""
        if self._chunks is not None:
            self._chunks.join()

    def seal(self, sha256: str, raw_size: int | None = None) -> str:
        """Name the upload by its hash (or keep the identical copy stored already); returns the hash."""
        if self._file is not None:
            self._file.place(sha256, self.size)
            written = _Written(sha256, self.size, raw_size)
        else:
            written = self._chunks.finish(sha256, self.size, raw_size)
        _seal(self._conn, self._location, [written], self._chunk_size)
        return sha256

    def abort(self) -> None:
        """Leave nothing behind: no file, no row, no chunks."""
        if self._file is not None:
            self._file.discard()
        else:
            self._chunks.discard()


class _Chunks:
    """The database store's bytes: cut into chunks, full batches COPYed by a thread.

    Full batches are handed to a thread that COPYs them (each its own
    transaction, into a row made unsealed by the first) while the caller
    packs the next ones; a bounded queue holds at most ``depth`` batches.
    An archive smaller than one batch never starts the thread: its chunks go
    into the sealing transaction.
    """

    def __init__(self, conn: psycopg.Connection, chunk_size: int, batch_bytes: int, depth: int) -> None:
        self._conn = conn
        self._chunk_size = chunk_size
        self._batch_bytes = batch_bytes
        self._depth = depth
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._queue: _queue.Queue[list[bytes] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.blob_id: int | None = None
        self.n_chunks = 0  # in binary_data already

    def write(self, data) -> None:
        self._buf += data
        while len(self._buf) >= self._chunk_size:
            self._pending.append(bytes(self._buf[: self._chunk_size]))
            del self._buf[: self._chunk_size]
            self._pending_bytes += self._chunk_size
            if self._pending_bytes >= self._batch_bytes:
                self._submit()

    def _submit(self) -> None:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if self._error is not None:
            raise self._error
        if self._depth == 0:  # no thread: COPY here (bench/tune.py compares)
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
                self._copy(batch)
            except BaseException as exc:  # handed to the producer
                self._error = exc

    def _copy(self, batch: list[bytes]) -> None:
        with _transaction(self._conn) as tx:
            if self.blob_id is None:
                self.blob_id = blobs.new_blob(self._conn, "db", begin=tx.begin())
            elif tx.begin():
                blobs.begin(self._conn)
            self.n_chunks = _copy_chunks(self._conn, [(self.blob_id, self.n_chunks, batch)], self._chunk_size)[0]

    def join(self) -> None:
        """Wait for the thread's batches; raise what went wrong in it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def finish(self, sha256: str, size: int, raw_size: int | None) -> _Written:
        self.join()
        if self._buf:
            self._pending.append(bytes(self._buf))
            self._buf.clear()
        rest, self._pending = self._pending, []
        return _Written(sha256, size, raw_size, rest, self.blob_id, self.n_chunks)

    def discard(self) -> None:
        try:
            self.join()
        except BaseException:
            pass
        if self.blob_id is not None and not self._conn.closed:
            blobs.drop(self._conn, self.blob_id)


# ------------------------------------------------------------------ the seal


@dataclass(frozen=True)
class _Written:
    """An archive whose bytes are where they go (but for chunks still in memory) and whose row is not sealed."""

    sha256: str
    size: int
    raw_size: int | None
    pieces: Sequence[bytes] = ()  # bytes still to COPY into binary_data, in order (database store)
    blob_id: int | None = None  # its row, made when its first batch went in (a large upload)
    n_chunks: int = 0  # its chunks in binary_data already


def _seal(conn: psycopg.Connection, location: str, written: list[_Written], chunk_size: int) -> None:
    """Seal uploads in one transaction; on a unique violation, one at a time, each the careful
    way if need be (``chunk_size``: what chunks still in memory are cut into)."""
    if len(written) == 1 and written[0].blob_id is not None:
        _seal_carefully(conn, location, written[0], chunk_size)
        return
    try:
        _seal_together(conn, location, written, chunk_size)
    except errors.UniqueViolation:
        # Rolled back: the same content was sealed meanwhile, or is hidden from us.
        if len(written) == 1:
            _seal_carefully(conn, location, written[0], chunk_size)
        else:
            for one in written:
                _seal(conn, location, [one], chunk_size)


def _seal_together(conn: psycopg.Connection, location: str, written: list[_Written], chunk_size: int) -> None:
    """The usual case, nothing stored meanwhile: two round trips and a COPY for any
    number of archives whose rows do not exist yet."""
    with _transaction(conn) as tx:
        ids = blobs.new_blobs_unless_stored(conn, [w.sha256 for w in written], location, begin=tx.begin())
        new = [w for w in written if w.sha256 in ids]
        if not new:
            return  # every one is stored already
        n_chunks = _copy_chunks(conn, [(ids[w.sha256], 0, w.pieces) for w in new], chunk_size)
        seals = [blobs.Seal(ids[w.sha256], w.sha256, w.size, w.raw_size, n) for w, n in zip(new, n_chunks)]
        blobs.seal(conn, seals, commit=tx.commit())


def _seal_carefully(conn: psycopg.Connection, location: str, w: _Written, chunk_size: int) -> None:
    """An upload whose row exists already, or whose first seal met a unique violation.

    Its seal runs in a savepoint, so a unique violation undoes only the seal:
    the upload is then compared with the stored copy (database store: the
    database compares the bytes and shares its copy only if they are the
    same) and dropped."""
    with _transaction(conn) as tx:
        blob_id = w.blob_id
        if blob_id is None:
            ids = blobs.new_blobs_unless_stored(conn, [w.sha256], location, begin=tx.begin())
            if not ids:
                return  # stored meanwhile
            blob_id = ids[w.sha256]
        elif blobs.is_stored(conn, w.sha256, begin=tx.begin()):
            blobs.drop(conn, blob_id)
            return
        n_chunks = _copy_chunks(conn, [(blob_id, w.n_chunks, w.pieces)], chunk_size)[0]
        try:
            with conn.transaction():
                blobs.seal(conn, [blobs.Seal(blob_id, w.sha256, w.size, w.raw_size, n_chunks)])
        except errors.UniqueViolation:
            if location == "db":
                # A file proves nothing to the database; chunks it can compare.
                blobs.adopt(conn, blob_id, w.sha256)
            blobs.drop(conn, blob_id)


def _copy_chunks(conn: psycopg.Connection, uploads: list[tuple[int, int, Sequence[bytes]]], chunk_size: int) -> list[int]:
    """One COPY of ``(blob_id, its first chunk's number, its bytes)`` each, cut into chunks; the
    number of chunks each blob has after it."""
    counts = [first for _blob_id, first, _pieces in uploads]
    if not any(pieces for _blob_id, _first, pieces in uploads):
        return counts
    with blobs.copy_chunks(conn) as write_row:
        for i, (blob_id, first, pieces) in enumerate(uploads):
            for no, chunk in enumerate(_rechunk(pieces, chunk_size), first):
                write_row((blob_id, no, chunk))
                counts[i] = no + 1
    return counts


def _rechunk(pieces: Sequence[bytes], size: int) -> Iterator[bytes]:
    """The bytes of ``pieces`` again, cut into ``size``-byte chunks (the last one shorter);
    pieces that are such chunks already are not copied."""
    buf = bytearray()
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        if not buf and (len(piece) == size or (i == last and len(piece) < size)):
            yield piece
            continue
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def _distinct(packed: list[Packed]) -> dict[str, Packed]:
    """One archive per sha256 (two tomodirs with the same content share it)."""
    distinct: dict[str, Packed] = {}
    for pieces, result in packed:
        distinct.setdefault(result.sha256, (pieces, result))
    return distinct


# ---------------------------------------------------------- the transaction


class _Transaction:
    """An upload's transaction in as few round trips as its statements allow.

    BEGIN and "commit without waiting for the disk" travel with the first
    statement (``begin=tx.begin()``), COMMIT with the last
    (``commit=tx.commit()``); COPY, which cannot be pipelined, runs between.
    Inside a caller's transaction it is a savepoint instead, and the
    caller's commit decides durability."""

    def __init__(self, conn: psycopg.Connection, stack: ExitStack) -> None:
        self._conn = conn
        self._stack = stack
        self.outer = conn.info.transaction_status == pq.TransactionStatus.IDLE

    def begin(self) -> bool:
        """Whether the first statement is to carry BEGIN (inside a caller's transaction: a savepoint opens now)."""
        if not self.outer:
            self._stack.enter_context(self._conn.transaction())
        return self.outer

    def commit(self) -> bool:
        """Whether the last statement is to carry COMMIT."""
        return self.outer


@contextmanager
def _transaction(conn: psycopg.Connection) -> Iterator[_Transaction]:
    with ExitStack() as stack:
        tx = _Transaction(conn, stack)
        try:
            yield tx
        except BaseException:
            if tx.outer and not conn.closed and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.rollback()
            raise
        if tx.outer and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            blobs.commit(conn)
