"""The web's database connections: the caller's own login, read-only, a few reused.

Every connection is opened as every command opens one
(:meth:`Database.connect`, the database resolved by ``open_database``), so
row-level security sees the login of whoever started ``crh web``.  Its
session starts read-only (``default_transaction_read_only``) with a
statement timeout: the web cannot change anything even by mistake, and no
page can hold the database for long.  Both are libpq startup options of the
connection, never a ``SET`` sent later: behind PgBouncer in transaction
pooling a ``SET`` would stay on a server connection that a worker gets
next (PgBouncer refuses the startup option unless told to ignore it, see
docs/deployment.md).  A connection that failed is dropped and the next
request opens a new one, so the web rides out a database restart.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import conninfo, pq

from cr_queue.db.connection import Database

APPLICATION_NAME = "crh web"
STATEMENT_TIMEOUT_MS = 30_000


def read_only_url(url: str, statement_timeout_ms: int) -> str:
    """``url`` with the startup options of a read-only session (after any options it has)."""
    given = conninfo.conninfo_to_dict(url).get("options") or ""
    ours = f"-c default_transaction_read_only=on -c statement_timeout={int(statement_timeout_ms)}"
    return conninfo.make_conninfo(url, options=f"{given} {ours}".strip())


class Connections:
    """Up to ``size`` idle connections kept for the next request; more are opened when needed."""

    def __init__(self, database: Database, size: int = 4, *, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> None:
        self.database = dataclasses.replace(database, url=read_only_url(database.url, statement_timeout_ms))
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue(maxsize=size)

    def open(self) -> psycopg.Connection:
        return self.database.connect(APPLICATION_NAME)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self.open()
        try:
            yield conn
        except psycopg.OperationalError:
            conn.close()
            raise
        finally:
            if conn.closed or conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.close()
            else:
                try:
                    self._idle.put_nowait(conn)
                except queue.Full:
                    conn.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
