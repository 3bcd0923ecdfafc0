"""Opening the database a command should talk to, with errors a person can act on.

Every command goes through :func:`open_database`: it resolves the location
(option, environment, config, legacy file, embedded default), starts the
embedded cluster when that is the choice, and makes sure the schema is the
one this version expects before any job is touched.

A service, not part of ``db/``: it reads the schema's revision through the
query layer (``queries/session.py``), which sits above ``db/``; the pieces it
composes (``db.connection``, ``db.embedded``, ``db.migrate``, the store) stay
below it.
"""

from __future__ import annotations

import logging

import psycopg

from cr_queue import config, store
from cr_queue.db.connection import Database, DatabaseError, unreachable_message
from cr_queue.queries import session

log = logging.getLogger(__name__)


def open_database(
    settings: config.Settings, *, start_embedded: bool = True, check_schema: bool = True
) -> Database:
    """Resolve and, for the embedded default, start the database; check its schema.

    The archive store comes from ``[store] path`` (:func:`store.configured`);
    a directory this host cannot read is reported first, before any job is
    touched.  The Database returned carries it to the services."""
    chosen = store.configured(settings)
    db = _open(settings, start_embedded=start_embedded, check_schema=check_schema)
    return Database(
        url=db.url,
        source=db.source,
        embedded=db.embedded,
        connect_timeout=db.connect_timeout,
        pooled=db.pooled,
        store=chosen,
    )


def _open(settings: config.Settings, *, start_embedded: bool, check_schema: bool) -> Database:
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
    db = Database(
        url=settings.database_url,
        source=settings.database_source,
        embedded=False,
        connect_timeout=settings.connect_timeout,
        pooled=settings.pooled,
    )
    if check_schema:
        ensure_schema(db, upgrade=False)
    return db


def ensure_schema(db: Database, *, upgrade: bool) -> None:
    """The schema this version needs, upgraded (``upgrade``) or else refused with the remedy."""
    from cr_queue.db import migrate

    expected = migrate.head()
    # The common case (schema current) is answered by one plain query, without
    # alembic and SQLAlchemy, whose import was a third of every command's start-up.
    if _revision(db) == expected:
        return
    try:
        have = migrate.current(db.url, connect_timeout=db.connect_timeout)
    except DatabaseError:
        raise
    except Exception as exc:  # sqlalchemy wraps psycopg's errors
        raise DatabaseError(unreachable_message(db.url, db.source, exc, db.connect_timeout)) from None
    if have == expected:
        return
    migrate.check_not_newer(have)
    if upgrade:
        log.info("upgrading the schema of %s from %s to %s", db.redacted, have, expected)
        migrate.upgrade(db.url, connect_timeout=db.connect_timeout)
        return
    raise DatabaseError(
        f"the database {db.redacted} has schema version {have or 'none'}, this cr_queue needs {expected}. "
        "Run `crh db upgrade` (as a role allowed to change the schema) and try again."
    )


def _revision(db: Database) -> str | None:
    """The database's schema revision by one plain query; None when that cannot tell (the full check says why).

    A server that cannot be reached is reported at once (DatabaseError): trying
    again through alembic would only double the wait on a silent server."""
    with db.connect("cr_queue schema check") as conn:
        try:
            return session.schema_revision(conn)
        except psycopg.Error:
            return None
