"""The statements about archives (``blobs.sql``), each behind one typed call.

cr_queue/store decides when each runs (the upload protocol, reading, garbage
collection); these wrappers only run them.  Statements that open, fill or
close an upload's transaction are sent in pipeline mode where the store
says so: a wrapper that reads a result waits for it, one that does not
leaves it to the pipeline's next synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import psycopg

from cr_queue.queries import loader

SQL = loader.load("blobs")


class BlobRow(NamedTuple):
    """What reading an archive needs of its row."""

    id: int
    n_chunks: int
    size: int
    location: str  # 'db': chunks in binary_data; 'dir': a file in the [store] path directory


class Seal(NamedTuple):
    """An upload's row, made unsealed, and what sealing it writes."""

    blob_id: int
    sha256: str
    size: int
    raw_size: int | None
    n_chunks: int


class Garbage(NamedTuple):
    id: int
    sha256: str | None  # None: an upload that never completed
    size: int
    location: str


def begin_without_waiting(conn: psycopg.Connection) -> None:
    """BEGIN, and a commit that will not wait for the disk (see ``commit_without_waiting``)."""
    conn.execute(SQL.begin)
    conn.execute(SQL.commit_without_waiting)


def new_blob(conn: psycopg.Connection, location: str) -> int:
    return conn.execute(SQL.new_blob, {"location": location}).fetchone()[0]


def new_blobs_unless_stored(conn: psycopg.Connection, shas: Sequence[str], location: str) -> dict[str, int]:
    """Unsealed rows for the hashes not stored yet: sha256 -> id (none for those stored)."""
    return dict(conn.execute(SQL.new_blobs_unless_stored, {"shas": list(shas), "location": location}).fetchall())


@contextmanager
def copy_chunks(conn: psycopg.Connection) -> Iterator[Callable[[tuple[int, int, bytes]], None]]:
    """A COPY into binary_data: call the function given with ``(blob_id, chunk_no, data)`` per chunk."""
    with conn.cursor() as cur, cur.copy(SQL.copy_chunks) as copy:
        copy.set_types(["int8", "int4", "bytea"])
        yield copy.write_row


def seal(conn: psycopg.Connection, seals: Sequence[Seal]) -> None:
    """Seal uploads (no result is read: in pipeline mode the next synchronisation reports a unique violation)."""
    conn.execute(
        SQL.seal,
        {
            "ids": [s.blob_id for s in seals],
            "shas": [s.sha256 for s in seals],
            "sizes": [s.size for s in seals],
            "raw_sizes": [s.raw_size for s in seals],
            "n_chunks": [s.n_chunks for s in seals],
        },
    )


def is_stored(conn: psycopg.Connection, sha256: str) -> bool:
    return bool(conn.execute(SQL.is_stored, {"sha256": sha256}).fetchone()[0])


def adopt(conn: psycopg.Connection, blob_id: int, sha256: str) -> bool:
    return bool(conn.execute(SQL.adopt, {"blob_id": blob_id, "sha256": sha256}).fetchone()[0])


def drop(conn: psycopg.Connection, blob_id: int) -> None:
    conn.execute(SQL.drop, {"blob_id": blob_id})


def look_up(conn: psycopg.Connection, shas: Sequence[str]) -> dict[str, BlobRow]:
    rows = conn.execute(SQL.look_up, {"shas": list(shas)}).fetchall()
    return {sha: BlobRow(*rest) for sha, *rest in rows}


def read_chunks(conn: psycopg.Connection, blob_id: int, first: int, n: int) -> list[tuple[int, bytes]]:
    """Chunks ``first``, ``first + 1``, ... (at most ``n``) of a blob the caller may see."""
    return conn.execute(SQL.read_chunks, {"blob_id": blob_id, "first": first, "n": n}, binary=True).fetchall()


def garbage(conn: psycopg.Connection, *, age_s: float, stale_s: float, limit: int) -> list[Garbage]:
    rows = conn.execute(SQL.garbage, {"age": age_s, "stale": stale_s, "limit": limit}).fetchall()
    return [Garbage(*row) for row in rows]


def delete_unreferenced(conn: psycopg.Connection, ids: Sequence[int]) -> list[Garbage]:
    return [Garbage(*row) for row in conn.execute(SQL.delete_unreferenced, {"ids": list(ids)}).fetchall()]


def known(conn: psycopg.Connection, shas: Sequence[str]) -> set[str]:
    return {row[0] for row in conn.execute(SQL.known, {"shas": list(shas)})}
