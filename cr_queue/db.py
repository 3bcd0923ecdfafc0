"""Opening the database a command should talk to, with errors a person can act on.

Every command goes through :func:`open_database`: it resolves the location
(option, environment, config, legacy file, embedded default), starts the
embedded cluster when that is the choice, and makes sure the schema is the
one this version expects before any job is touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from . import config, migrate

log = logging.getLogger(__name__)


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

    @property
    def redacted(self) -> str:
        return config.redact(self.url)

    def connect(
        self, application_name: str = "cr_queue", *, autocommit: bool = True, keepalive: bool = False
    ) -> psycopg.Connection:
        return connect(
            self.url, application_name=application_name, autocommit=autocommit, source=self.source, keepalive=keepalive
        )


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


def open_database(
    settings: config.Settings, *, start_embedded: bool = True, check_schema: bool = True
) -> Database:
    """Resolve and, for the embedded default, start the database; check its schema."""
    if settings.database_url is None:
        from . import embedded

        cluster = embedded.default_cluster()
        if start_embedded:
            try:
                cluster.start()
            except embedded.EmbeddedError as exc:
                raise DatabaseError(str(exc)) from None
        db = Database(url=cluster.url, source="embedded", embedded=True)
        if start_embedded:
            # The private cluster is ours to keep current: nobody else would run the upgrade.
            ensure_schema(db, upgrade=True)
        return db
    db = Database(url=settings.database_url, source=settings.database_source, embedded=False)
    if check_schema:
        ensure_schema(db, upgrade=False)
    return db


def ensure_schema(db: Database, *, upgrade: bool) -> None:
    expected = migrate.head()
    try:
        have = migrate.current(db.url)
    except Exception as exc:  # sqlalchemy wraps psycopg's errors
        raise DatabaseError(unreachable_message(db.url, db.source, exc)) from None
    if have == expected:
        return
    if upgrade:
        log.info("upgrading the schema of %s from %s to %s", db.redacted, have, expected)
        migrate.upgrade(db.url)
        return
    raise DatabaseError(
        f"the database {db.redacted} has schema version {have or 'none'}, this cr_queue needs {expected}. "
        "Run `crh db upgrade` (as a role allowed to change the schema) and try again."
    )
