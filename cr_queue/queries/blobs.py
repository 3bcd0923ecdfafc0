"""The statements about archives (``blobs.sql``), each behind one typed call.

cr_queue/store decides when each runs (the upload protocol, reading, garbage
collection); these wrappers only run them.  An upload's transaction costs
as few round trips as its statements: a wrapper called with ``begin=True``
sends BEGIN (and a commit that will not wait for the disk: ``begin`` in
blobs.sql says why that is safe) in one round trip with its own statement,
one called with ``commit=True`` sends COMMIT with it (pipeline mode; the
result is read once the round trip is over).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import NamedTuple

import psycopg

from cr_queue.queries import loader, session

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
    """An archive nobody needs, as ``garbage`` in blobs.sql defines it."""

    id: int
    sha256: str | None  # None: an upload that never completed
    complete: bool
    location: str
    created: datetime
    bytes: int  # its size, or for an incomplete upload what its chunks take


def _run(conn: psycopg.Connection, statement: str, params: dict, *, begin: bool = False, commit: bool = False) -> psycopg.Cursor:
    """Execute one statement, with the transaction's BEGIN before it or COMMIT after it in the same round trip."""
    if not (begin or commit):
        return conn.execute(statement, params)
    with conn.pipeline():
        if begin:
            _begin(conn)
        cursor = conn.execute(statement, params)
        if commit:
            conn.execute(SQL.commit)
    return cursor


def begin(conn: psycopg.Connection) -> None:
    """BEGIN, and a commit that will not wait for the disk, in one round trip."""
    with conn.pipeline():
        _begin(conn)


def _begin(conn: psycopg.Connection) -> None:
    conn.execute(SQL.begin)
    session.synchronous_commit(conn, False, local=True)


def commit(conn: psycopg.Connection) -> None:
    conn.execute(SQL.commit)


def new_blob(conn: psycopg.Connection, location: str, *, begin: bool = False) -> int:
    return _run(conn, SQL.new_blob, {"location": location}, begin=begin).fetchone()[0]


def new_blobs_unless_stored(conn: psycopg.Connection, shas: Sequence[str], location: str, *, begin: bool = False) -> dict[str, int]:
    """Unsealed rows for the hashes not stored yet: sha256 -> id (none for those stored)."""
    if len(shas) == 1:
        row = _run(conn, SQL.new_blob_unless_stored, {"sha256": shas[0], "location": location}, begin=begin).fetchone()
        return {shas[0]: row[0]} if row is not None else {}
    return dict(_run(conn, SQL.new_blobs_unless_stored, {"shas": list(shas), "location": location}, begin=begin).fetchall())


@contextmanager
def copy_chunks(conn: psycopg.Connection) -> Iterator[Callable[[tuple[int, int, bytes]], None]]:
    """A COPY into binary_data: call the function given with ``(blob_id, chunk_no, data)`` per chunk."""
    with conn.cursor() as cur, cur.copy(SQL.copy_chunks) as copy:
        copy.set_types(["int8", "int4", "bytea"])
        yield copy.write_row


def seal(conn: psycopg.Connection, seals: Sequence[Seal], *, commit: bool = False) -> None:
    """Seal uploads; psycopg.errors.UniqueViolation if one's content is stored already."""
    if len(seals) == 1:
        _run(conn, SQL.seal, seals[0]._asdict(), commit=commit)
        return
    params = {
        "ids": [s.blob_id for s in seals],
        "shas": [s.sha256 for s in seals],
        "sizes": [s.size for s in seals],
        "raw_sizes": [s.raw_size for s in seals],
        "n_chunks": [s.n_chunks for s in seals],
    }
    _run(conn, SQL.seal_many, params, commit=commit)


def is_stored(conn: psycopg.Connection, sha256: str, *, begin: bool = False) -> bool:
    return bool(_run(conn, SQL.is_stored, {"sha256": sha256}, begin=begin).fetchone()[0])


def adopt(conn: psycopg.Connection, blob_id: int, sha256: str) -> bool:
    return bool(conn.execute(SQL.adopt, {"blob_id": blob_id, "sha256": sha256}).fetchone()[0])


def drop(conn: psycopg.Connection, blob_id: int) -> None:
    conn.execute(SQL.drop, {"blob_id": blob_id})


def look_up(conn: psycopg.Connection, shas: Sequence[str]) -> dict[str, BlobRow]:
    if len(shas) == 1:
        rows = conn.execute(SQL.look_up, {"sha256": shas[0]}).fetchall()
    else:
        rows = conn.execute(SQL.look_up_many, {"shas": list(shas)}).fetchall()
    return {sha: BlobRow(*rest) for sha, *rest in rows}


def read_chunks(conn: psycopg.Connection, blob_id: int, first: int, n: int) -> list[tuple[int, bytes]]:
    """Chunks ``first``, ``first + 1``, ... (at most ``n``) of a blob the caller may see."""
    return conn.execute(SQL.read_chunks, {"blob_id": blob_id, "first": first, "n": n}, binary=True).fetchall()


def garbage(
    conn: psycopg.Connection,
    *,
    grace_s: float,
    stale_s: float,
    doomed: Sequence[int] = (),
    released: Sequence[str] = (),
    ids: Sequence[int] | None = None,
    limit: int | None = None,
) -> list[Garbage]:
    """The archives nobody needs (locked until the transaction ends); ``limit`` None: all of them."""
    params = {
        "grace": grace_s,
        "stale": stale_s,
        "doomed": list(doomed),
        "released": list(released),
        "ids": None if ids is None else list(ids),
        "limit": limit,
    }
    return [Garbage(*row) for row in conn.execute(SQL.garbage, params).fetchall()]


def delete_garbage(conn: psycopg.Connection, ids: Sequence[int]) -> list[int]:
    """Delete archives ``garbage`` has just chosen and locked in this transaction."""
    return [row[0] for row in conn.execute(SQL.delete_garbage, {"ids": list(ids)}).fetchall()]


def known(conn: psycopg.Connection, shas: Sequence[str]) -> set[str]:
    return {row[0] for row in conn.execute(SQL.known, {"shas": list(shas)})}
