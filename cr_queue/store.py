"""Archive content in the database: chunked, content addressed, streamed both ways.

An archive is written while it is being produced (tar → zstd → sha256 runs in
the caller), so its hash is known only at the end: chunks are stored under a
surrogate blob id and the blob is given its sha256 when the stream closes.
If that content is already stored, the new copy is dropped and the old one
used, so every archive is stored once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import psycopg
from psycopg import errors

from . import archive

CHUNK_SIZE = 1 << 20
# Chunks buffered per COPY: bounds memory and keeps each transaction short.
BATCH_BYTES = 8 << 20
READ_BATCH = 8

_NEW_BLOB = "INSERT INTO blobs DEFAULT VALUES RETURNING id"
_COPY_CHUNKS = "COPY binary_data (blob_id, chunk_no, data) FROM STDIN (FORMAT BINARY)"
_EXISTING = "SELECT id FROM blobs WHERE sha256 = %s AND complete"
_SEAL = (
    "UPDATE blobs SET sha256 = %s, size = %s, raw_size = %s, n_chunks = %s, complete = true, "
    "datetime_completed = now() WHERE id = %s"
)
_DROP = "DELETE FROM blobs WHERE id = %s"
_LOOKUP = "SELECT id, n_chunks, size FROM blobs WHERE sha256 = %s AND complete"
# Through the view: it shows only chunks of blobs the caller may see (row-level security).
_READ = (
    "SELECT chunk_no, data FROM blob_chunks WHERE blob_id = %s AND chunk_no >= %s "
    "ORDER BY chunk_no LIMIT %s"
)
# Our upload's bytes equal a stored copy we may not see: the database checks and shares it.
_ADOPT = "SELECT crh_adopt_blob(%s, %s)"
_HAS = "SELECT EXISTS (SELECT 1 FROM blobs WHERE sha256 = %s AND complete)"


class BlobMissing(Exception):
    """An archive a job refers to is not (or no longer) stored."""


class BlobWriter:
    """A write-only file object that lands in ``binary_data``; use with :func:`archive.pack`."""

    def __init__(self, conn: psycopg.Connection, *, chunk_size: int = CHUNK_SIZE) -> None:
        self._conn = conn
        self._chunk_size = chunk_size
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._n_chunks = 0
        self.size = 0
        self.blob_id: int = conn.execute(_NEW_BLOB).fetchone()[0]

    def write(self, data: bytes) -> int:
        self._buf += data
        self.size += len(data)
        while len(self._buf) >= self._chunk_size:
            self._queue(bytes(self._buf[: self._chunk_size]))
            del self._buf[: self._chunk_size]
        return len(data)

    def _queue(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        with self._conn.transaction(), self._conn.cursor() as cur:
            with cur.copy(_COPY_CHUNKS) as copy:
                copy.set_types(["int8", "int4", "bytea"])
                for chunk in self._pending:
                    copy.write_row((self.blob_id, self._n_chunks, chunk))
                    self._n_chunks += 1
        self._pending.clear()
        self._pending_bytes = 0

    def seal(self, sha256: str, raw_size: int | None = None) -> str:
        """Store the last chunks and name the blob by its hash (or reuse an identical one)."""
        if self._buf:
            self._queue(bytes(self._buf))
            self._buf.clear()
        self._flush()
        try:
            with self._conn.transaction():
                if self._conn.execute(_EXISTING, (sha256,)).fetchone():
                    self._conn.execute(_DROP, (self.blob_id,))
                else:
                    self._conn.execute(_SEAL, (sha256, self.size, raw_size, self._n_chunks, self.blob_id))
        except errors.UniqueViolation:
            # Someone sealed the same content in the meantime (or another user's copy is
            # hidden from us): theirs is as good as ours once the database has compared them.
            self._conn.execute(_ADOPT, (self.blob_id, sha256))
            self.abort()
        return sha256

    def abort(self) -> None:
        self._conn.execute(_DROP, (self.blob_id,))


def put_tree(conn: psycopg.Connection, root, *, members=None, chunk_size: int = CHUNK_SIZE) -> archive.PackResult:
    """Pack a directory straight into the store in one streaming pass."""
    writer = BlobWriter(conn, chunk_size=chunk_size)
    try:
        result = archive.pack(root, writer, members=members)
    except BaseException:
        try:
            writer.abort()
        except psycopg.Error:
            pass
        raise
    writer.seal(result.sha256, result.raw_size)
    return result


def exists(conn: psycopg.Connection, sha256: str) -> bool:
    return bool(conn.execute(_HAS, (sha256,)).fetchone()[0])


def chunks(conn: psycopg.Connection, sha256: str) -> Iterator[bytes]:
    """Yield a blob's chunks in order, a few at a time, in short statements."""
    row = conn.execute(_LOOKUP, (sha256,)).fetchone()
    if row is None:
        raise BlobMissing(f"archive {sha256[:12]} is not in the store")
    blob_id, n_chunks, _size = row
    next_no = 0
    while next_no < n_chunks:
        rows = conn.execute(_READ, (blob_id, next_no, READ_BATCH), binary=True).fetchall()
        if not rows:
            break
        for chunk_no, data in rows:
            if chunk_no != next_no:
                raise BlobMissing(f"archive {sha256[:12]} lacks chunk {next_no}")
            yield bytes(data)
            next_no += 1
    if next_no != n_chunks:
        raise BlobMissing(f"archive {sha256[:12]} lacks chunk {next_no}")


def fetch(conn: psycopg.Connection, sha256: str, dst: BinaryIO) -> int:
    """Copy a blob into a file, verifying its sha256 before anyone may unpack it."""
    return archive.copy_verified(chunks(conn, sha256), dst, sha256)
