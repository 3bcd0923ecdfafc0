"""Reading archives back, from whichever store holds them, verified before anyone unpacks.

Where an archive's bytes are is its ``blobs`` row's business (``location``),
not the installation's current choice: archives written before a directory
store was configured stay readable.  The row also decides who may read: what
row-level security hides from the caller it does not get from a directory
either.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import psycopg

from cr_queue.queries import blobs
from cr_queue.queries.blobs import BlobRow
from cr_queue.store.choice import Store
from cr_queue.store.directory import DirectoryStore
from cr_queue.store.errors import BlobMissing, StoreUnavailable
from cr_queue.tomodir import archive

# Chunks per statement when reading from the database (bench/tune.py measured it).
READ_BATCH = 8


def look_up(conn: psycopg.Connection, shas: Iterable[str]) -> dict[str, BlobRow]:
    """Many archives' rows in one statement, for :func:`fetch` (those the caller may see)."""
    return blobs.look_up(conn, sorted(set(shas)))


def fetch(conn: psycopg.Connection, where: Store, sha256: str, dst: BinaryIO, *, row: BlobRow | None = None) -> int:
    """Copy an archive into a file, verifying its sha256 before anyone may unpack it; the bytes copied.

    ``where``: this installation's store (an archive kept in a directory
    needs this host to have it configured).  ``row``: the archive's row from
    :func:`look_up` where the caller has it (one round trip fewer)."""
    row = _row(conn, sha256, row)
    if row.location == "db":
        return archive.copy_verified(chunks(conn, sha256, row=row), dst, sha256)
    if not isinstance(where, DirectoryStore):
        raise StoreUnavailable(
            errno.ENOENT,
            f"archive {sha256[:12]} is kept in a shared-directory store, but host {socket.gethostname()} has "
            "no [store] path configured; set [store] path in the config (the same directory the other "
            "hosts use) and make sure it is mounted here",
        )
    return where.read(sha256, dst)


def chunks(conn: psycopg.Connection, sha256: str, *, row: BlobRow | None = None) -> Iterator[bytes]:
    """Yield a database blob's chunks in order, a few at a time, in short statements
    (``row``: its row, if the caller has looked it up already)."""
    row = _row(conn, sha256, row)
    if row.location != "db":
        raise BlobMissing(f"archive {sha256[:12]} is kept in a directory store, not in the database")
    next_no = 0
    while next_no < row.n_chunks:
        batch = blobs.read_chunks(conn, row.id, next_no, READ_BATCH)
        if not batch:
            break
        for chunk_no, data in batch:
            if chunk_no != next_no:
                raise BlobMissing(f"archive {sha256[:12]} lacks chunk {next_no}")
            yield data
            next_no += 1
    if next_no != row.n_chunks:
        raise BlobMissing(f"archive {sha256[:12]} lacks chunk {next_no}")


def _row(conn: psycopg.Connection, sha256: str, row: BlobRow | None) -> BlobRow:
    """The archive's row: the caller's, or looked up now; BlobMissing without one."""
    if row is None:
        row = blobs.look_up(conn, [sha256]).get(sha256)
    if row is None:
        raise BlobMissing(f"archive {sha256[:12]} is not in the store")
    return row
