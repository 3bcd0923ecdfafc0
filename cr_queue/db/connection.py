"""Opening the database a command should talk to, with errors a person can act on.

Every command goes through :func:`open_database`: it resolves the location
(option, environment, config, legacy file, embedded default), starts the
embedded cluster when that is the choice, and makes sure the schema is the
one this version expects before any job is touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg

from cr_queue import config

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
    # Where archives go (a cr_queue.store.Store: the database, or the [store] path
    # directory).  The store layer, above this one, chooses it when a command opens
    # the database (store.open_database); this layer only carries it to the services.
    store: Any = field(default=None, compare=False)

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
    """Resolve and, for the embedded default, start the database; check its schema.

    Commands open it through ``store.open_database``, which adds the archive
    store the installation chose (``[store] path``)."""
    if settings.database_url is None:
        from cr_queue.db import embedded

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
    # The common case (schema current) is answered without alembic and
    # SQLAlchemy, whose import was a third of every command's start-up.
    if _quick_revision_check(db):
        return
    from cr_queue.db import migrate

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


_REVISION = re.compile(r"^revision\s*=\s*[\"']([^\"']+)[\"']", re.M)
_DOWN_REVISION = re.compile(r"^down_revision\s*=\s*(.+)$", re.M)


def _head_revision() -> str | None:
    """The newest migration, read from the migration files themselves; None if unsure."""
    revisions: set[str] = set()
    parents: set[str] = set()
    try:
        for entry in resources.files("cr_queue.db.migrations").joinpath("versions").iterdir():
            if not entry.name.endswith(".py") or entry.name.startswith("__"):
                continue
            text = entry.read_text(encoding="utf-8")
            revision, down = _REVISION.search(text), _DOWN_REVISION.search(text)
            if revision is None or down is None:
                return None
            revisions.add(revision.group(1))
            parents.update(re.findall(r"[\"']([^\"']+)[\"']", down.group(1)))
    except (OSError, ModuleNotFoundError):
        return None
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _quick_revision_check(db: Database) -> bool:
    """True when the database's schema is this version's, by one plain query."""
    head = _head_revision()
    if head is None:
        return False
    try:
        with psycopg.connect(db.url, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT version_num FROM alembic_version WHERE to_regclass('alembic_version') IS NOT NULL"
            ).fetchone()
    except psycopg.Error:
        return False  # the full check reports what is wrong
    return row is not None and row[0] == head
