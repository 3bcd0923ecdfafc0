"""Settings of one database session and the housekeeping around them (``session.sql``).

Nothing here touches a job; these are the few statements the services send
about the session itself, kept with every other statement so that one search
finds them all.

Behind a transaction-pooling pooler (``[database] pooler = "transaction"``;
:func:`cr_queue.db.connection.is_pooled`) a session-level setting would stay
on the server connection the pooler lent for one transaction, and so apply
to whichever client gets that server connection next, while this client's
next transaction may run on another one without it.  On such connections the
wrappers below send no session-level SET: each says what it does instead
(a setting local to an explicit transaction, or nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg

from cr_queue.db.connection import is_pooled
from cr_queue.queries import loader

SQL = loader.load("session")


def bound_idle_transactions(conn: psycopg.Connection, seconds: float) -> None:
    """Have the server end this session if it leaves a transaction open for ``seconds``.

    A worker's transactions are a few statements sent back to back, so one left
    open means the worker was cut off mid-transaction (half-open connection).
    Its row locks would hide the job from the rescue sweep (SKIP LOCKED) until
    the server's TCP keepalive gives up, two hours later by default.

    Through a transaction-pooling pooler this sends nothing: the setting would
    stay on a server connection that other clients get next and would not
    follow this client to its next one.  There the pooler ends a vanished
    client's transaction when its TCP keepalive gives up on the client
    (PgBouncer's ``tcp_keepidle``/``tcp_keepintvl``/``tcp_keepcnt``, see
    docs/deployment.md, "Behind PgBouncer"); its ``idle_transaction_timeout``
    would also end the transaction that holds crh_add's directory locks
    (:func:`try_transaction_locks`).
    """
    if is_pooled(conn):
        return
    conn.execute(SQL.bound_idle_transactions, {"timeout": f"{max(1, int(seconds * 1000))}ms"})


def synchronous_commit(conn: psycopg.Connection, on: bool, *, local: bool = False) -> None:
    """Let commits return before their WAL is on disk (``on=False``), or wait again.

    A crash may then lose the last commits, never corrupt anything: for work
    that is made durable before anyone is told it is done (see
    :func:`durable_commit`).  ``local`` limits it to the current transaction.

    Through a transaction-pooling pooler only ``local`` is sent (it ends with
    the transaction, on the server connection that ran it); a session-wide one
    is skipped, because it would stay on a server connection other clients get
    next and not follow this client to its next one: its commits then wait
    for the disk as the server's default says.
    """
    if not local and is_pooled(conn):
        return
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
    of every asynchronous commit before it, because it writes WAL of its own
    (PostgreSQL does not wait for a transaction that wrote none; see
    session.sql).

    Through a transaction-pooling pooler the setting is made local to that one
    transaction (which may run on any server connection, perhaps one another
    client left with ``synchronous_commit = off``), so no session-level SET is
    sent and the commit still waits for the disk.
    """
    if is_pooled(conn):
        with conn.transaction():
            synchronous_commit(conn, True, local=True)
            conn.execute(SQL.durable_commit)
        return
    synchronous_commit(conn, True)
    conn.execute(SQL.durable_commit)


@contextmanager
def read_only_snapshot(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """One consistent, read-only view for all the queries inside (totals agree with the lists).

    On a connection already inside a transaction the view is that transaction's.
    SET TRANSACTION lasts only for the transaction, so this is safe through a
    transaction-pooling pooler too.
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


def try_transaction_locks(conn: psycopg.Connection, keys: Sequence[int]) -> dict[int, str]:
    """Lock ``keys`` until ``conn`` closes, through a transaction-pooling pooler; those another
    session holds, each with that session's application_name ("" where it cannot be seen).

    A session lock (jobs.try_locks) would stay on the server connection the pooler lent for one
    transaction: after the command ended, every later run would find the directory taken, until
    the pooler closes that server connection (an hour, with PgBouncer's server_lifetime).  So
    the locks are the transaction's, in a transaction left open on ``conn`` (which stops being
    autocommit); it keeps one server connection for the run, and ends with the connection, its
    locks with it, also when the command is killed.  Such a transaction holds no snapshot
    between statements and writes nothing, so it holds back no vacuum.
    """
    if conn.autocommit:
        conn.autocommit = False
    busy = conn.execute(SQL.try_transaction_locks, {"keys": list(keys)}).fetchall()
    return {key: holder or "" for key, holder in busy}
