"""Connections to the database, with errors a person can act on.

:class:`Database` says where the database is; :func:`connect` opens a
connection to it.  Which database a command talks to, started and at the
right schema, is decided by ``cr_queue.database.open_database``.

Every connection cr_queue opens to a configured server goes through
:func:`connect`, with a connect timeout (``[database] connect_timeout``,
``CRH_CONNECT_TIMEOUT``, default 10 s): a server that accepts the connection
and never answers would otherwise hold each command for psycopg's default of
130 s, per attempt.

Behind a transaction-pooling pooler (PgBouncer's ``pool_mode = transaction``;
``[database] pooler = "transaction"``, ``CRH_DATABASE_POOLER``) each
transaction may run on another server connection, shared with other clients.
:class:`Database` then says ``pooled``, and :func:`connect` opens
:class:`PooledConnection` objects that never prepare statements on the server
(``prepare_threshold=None``: psycopg would otherwise prepare a statement run
more than five times as ``_pg3_0``, ..., on whichever server connection ran it,
and the next client there fails with DuplicatePreparedStatement); the query
layer asks :func:`is_pooled` before it sends anything that would stay on the
server connection (session-level SET, see ``queries/session.py``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cr_queue import config

KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}


class PooledConnection(psycopg.Connection):
    """A connection through a transaction-pooling pooler: nothing may rest on its server session.

    Only a marker (:func:`is_pooled`); it behaves as any psycopg connection."""


def is_pooled(conn: psycopg.Connection) -> bool:
    """Whether ``conn`` reaches the database through a transaction-pooling pooler."""
    return isinstance(conn, PooledConnection)


class DatabaseError(Exception):
    """The database cannot be used; the message says which one and what to do."""


@dataclass(frozen=True)
class Database:
    url: str
    source: str
    embedded: bool
    connect_timeout: int = config.DEFAULT_CONNECT_TIMEOUT
    # Reached through a transaction-pooling pooler ([database] pooler = "transaction"):
    # no server-side prepared statements, no session state (see the module's docstring).
    pooled: bool = False
    # Where archives go (a cr_queue.store.Store: the database, or the [store] path
    # directory).  cr_queue.database.open_database has the store layer, above this
    # one, choose it (store.configured); this layer only carries it to the services.
    store: Any = field(default=None, compare=False)

    @property
    def redacted(self) -> str:
        return config.redact(self.url)

    def connect(
        self, application_name: str = "cr_queue", *, autocommit: bool = True, keepalive: bool = False
    ) -> psycopg.Connection:
        return connect(
            self.url,
            application_name=application_name,
            autocommit=autocommit,
            source=self.source,
            keepalive=keepalive,
            connect_timeout=self.connect_timeout,
            pooled=self.pooled,
        )


def connect(
    url: str,
    *,
    application_name: str = "cr_queue",
    autocommit: bool = True,
    source: str = "",
    connect_timeout: int = config.DEFAULT_CONNECT_TIMEOUT,
    keepalive: bool = False,
    pooled: bool = False,
) -> psycopg.Connection:
    """Open a connection, or raise DatabaseError naming the server and the remedy.

    ``connect_timeout`` bounds each attempt, unless the URL sets its own
    (``?connect_timeout=N``), which libpq's users expect to count.  ``pooled``:
    through a transaction-pooling pooler, a :class:`PooledConnection` that
    prepares no statement on the server."""
    # A worker must notice a dead network within seconds, not the kernel's
    # fifteen minutes of retransmissions (ignored on Unix sockets).
    extra = dict(KEEPALIVE) if keepalive else {}
    if not _names_timeout(url):
        extra["connect_timeout"] = connect_timeout
    opener = psycopg.Connection.connect
    if pooled:
        opener = PooledConnection.connect
        extra["prepare_threshold"] = None
    try:
        return opener(url, autocommit=autocommit, application_name=application_name, **extra)
    except psycopg.OperationalError as exc:
        _close_abandoned_attempt(exc)
        raise DatabaseError(unreachable_message(url, source, exc, connect_timeout)) from None


def _close_abandoned_attempt(exc: BaseException | None) -> None:
    """Close the socket of a connection attempt that timed out, now.

    psycopg (3.3) gives up on a timed-out attempt without closing it: the
    attempt's libpq connection stays referenced from the frames of the error's
    traceback, which form a cycle with the error, so its socket stays open
    until the cyclic garbage collector runs (and never while the error is
    held, as a worker's retry loop holds it).  The server meanwhile finishes
    starting that backend and keeps it waiting for a query that never comes.
    200 workers retrying through an overloaded server filled max_connections
    with such connections and finished no job (issue 16).  Clearing the
    frames' locals frees the attempt, and libpq closes its socket.
    """
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


def _names_timeout(url: str) -> bool:
    try:
        return "connect_timeout" in psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return False  # a malformed URL: psycopg.connect says what is wrong with it


def unreachable_message(url: str, source: str, exc: BaseException, timeout: int | None = None) -> str:
    detail = config.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    where = f" (from {source})" if source else ""
    if isinstance(exc, psycopg.errors.ConnectionTimeout) or "timeout expired" in detail:
        # Reached, but no answer: a hung or overloaded server, or a firewall that drops packets.
        limit = f"within {timeout} s" if timeout else "in time"
        return (
            f"the database server {config.redact(url)}{where} did not answer {limit} (connect timeout). "
            "Check that the server is running, not overloaded, and that a firewall lets its answers through, "
            "and that the URL names a PostgreSQL server (--db, CRH_DATABASE_URL or [database] url in the config); "
            "to wait longer, set CRH_CONNECT_TIMEOUT or [database] connect_timeout (seconds)."
        )
    if "password" in detail and ("no password supplied" in detail or "authentication failed" in detail):
        # The server wants a password: say where it belongs (never in a shared file or a URL).
        return (
            f"cannot log in to the database {config.redact(url)}{where}: {detail}. "
            "Put the password in ~/.pgpass (a line host:port:database:user:password, chmod 600; "
            "libpq ignores the file otherwise) or use a PostgreSQL service file; see docs/security.md."
        )
    return (
        f"cannot connect to the database {config.redact(url)}{where}: {detail}. "
        "Check that the server is running and reachable, and the URL "
        "(--db, CRH_DATABASE_URL or [database] url in the config); "
        "without any of them cr_queue uses its embedded database."
    )
