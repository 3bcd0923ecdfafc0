"""The web's database connections: the caller's own login, read-only, a few reused.

Every connection is opened exactly as every command opens one
(:meth:`Database.connect`, the database resolved by ``open_database``), so
row-level security sees the login of whoever started ``crh web``.  Each
session is then made read-only (``default_transaction_read_only``) with a
statement timeout: the web cannot change anything even by mistake, and no
page can hold the database for long.  A connection that failed is dropped
and the next request opens a new one, so the web rides out a database
restart.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import pq

from cr_queue.db.connection import Database
from cr_queue.queries import web as wq

APPLICATION_NAME = "crh web"
STATEMENT_TIMEOUT_MS = 30_000


class Connections:
    """Up to ``size`` idle connections kept for the next request; more are opened when needed."""

    def __init__(self, database: Database, size: int = 4, *, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> None:
        self.database = database
        self.statement_timeout_ms = statement_timeout_ms
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue(maxsize=size)

    def open(self) -> psycopg.Connection:
        conn = self.database.connect(APPLICATION_NAME)
        try:
            wq.read_only_session(conn, statement_timeout_ms=self.statement_timeout_ms)
        except BaseException:
            conn.close()
            raise
        return conn

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
