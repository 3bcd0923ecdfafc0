"""Connections to the database, with errors a person can act on.

:class:`Database` says where the database is; :func:`connect` opens a
connection to it.  Which database a command talks to, started and at the
right schema, is decided by ``cr_queue.database.open_database``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from cr_queue import config
from cr_queue import store

KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}


class DatabaseError(Exception):
    """The database cannot be used; the message says which one and what to do."""


@dataclass(frozen=True)
class Database:
    url: str
    source: str
    embedded: bool
    # Where archives go: the database, or the [store] path directory (store.py).
    store: store.Store = field(default=store.DATABASE, compare=False)

    @property
    def redacted(self) -> str:
        return config.redact(self.url)

    def connect(
        self, application_name: str = "cr_queue", *, autocommit: bool = True, keepalive: bool = False
    ) -> psycopg.Connection:
        conn = connect(
            self.url, application_name=application_name, autocommit=autocommit, source=self.source, keepalive=keepalive
        )
        return store.bind(conn, self.store)


def connect(
    url: str,
    *,
    application_name: str = "cr_queue",
    autocommit: bool = True,
    source: str = "",
    connect_timeout: int = 10,
    keepalive: bool = False,
) -> psycopg.Connection:
    # A worker must notice a dead network within seconds, not the kernel's
    # fifteen minutes of retransmissions (ignored on Unix sockets).
    extra = KEEPALIVE if keepalive else {}
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            application_name=application_name,
            connect_timeout=connect_timeout,
            **extra,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseError(unreachable_message(url, source, exc)) from None


def unreachable_message(url: str, source: str, exc: BaseException) -> str:
    detail = config.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    where = f" (from {source})" if source else ""
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
