"""Settings of one database session and the housekeeping around them (``session.sql``).

Nothing here touches a job; these are the few statements the services send
about the session itself, kept with every other statement so that one search
finds them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from cr_queue.queries import loader

SQL = loader.load("session")


def bound_idle_transactions(conn: psycopg.Connection, seconds: float) -> None:
    """Have the server end this session if it leaves a transaction open for ``seconds``.

    A worker's transactions are a few statements sent back to back, so one left
    open means the worker was cut off mid-transaction (half-open connection).
    Its row locks would hide the job from the rescue sweep (SKIP LOCKED) until
    the server's TCP keepalive gives up, two hours later by default.
    """
    conn.execute(SQL.bound_idle_transactions, {"timeout": f"{max(1, int(seconds * 1000))}ms"})


def synchronous_commit(conn: psycopg.Connection, on: bool, *, local: bool = False) -> None:
    """Let commits return before their WAL is on disk (``on=False``), or wait again.

    A crash may then lose the last commits, never corrupt anything: for work
    that is made durable before anyone is told it is done (see
    :func:`durable_commit`).  ``local`` limits it to the current transaction.
    """
    conn.execute(SQL.synchronous_commit, {"setting": "on" if on else "off", "local": local})


def bound_idle_session(conn: psycopg.Connection, seconds: float) -> None:
    """Have the server end this session if it sends nothing for ``seconds`` (PostgreSQL 14 and later).

    For a session that speaks every few seconds (a worker's control connection):
    cut off so that the server's end stays open, it would keep its session
    locks, the rescue leader lock among them, until the server's TCP keepalive
    gives up, two hours later by default, and nobody would sweep meanwhile.
    """
    conn.execute(SQL.bound_idle_session, {"timeout": f"{max(1, int(seconds * 1000))}ms"})


def durable_commit(conn: psycopg.Connection) -> None:
    """Make every earlier commit durable: turn synchronous_commit on again, then commit one transaction.

    That commit waits for the WAL up to it to reach disk, and with it the WAL
    of every asynchronous commit before it.
    """
    synchronous_commit(conn, True)
    conn.execute(SQL.durable_commit)


@contextmanager
def read_only_snapshot(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """One consistent, read-only view for all the queries inside (totals agree with the lists).

    On a connection already inside a transaction the view is that transaction's.
    """
    fresh = conn.autocommit
    with conn.transaction():
        if fresh:
            conn.execute(SQL.read_only_snapshot)
        yield conn


def schema_revision(conn: psycopg.Connection) -> str | None:
    """The alembic revision of the database's schema; None when it has none (no migration ran)."""
    if not conn.execute(SQL.has_schema_revision).fetchone()[0]:
        return None
    try:
        with conn.transaction():
            row = conn.execute(SQL.schema_revision).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return row[0] if row else None
