"""Schema migrations through alembic, driven in code so installed copies need no alembic.ini.

alembic and SQLAlchemy are imported only when a migration function runs:
importing them cost every command a third of its start-up (0.3 s), and
commands check the schema version without them (db.ensure_schema).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import Connection


def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("cr_queue.db.migrations")))
    return cfg


def _engine(url: str):
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # A creator keeps libpq in charge of the URL: Unix-socket hosts, conninfo
    # strings and ~/.pgpass all work exactly as for the rest of cr_queue.
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(url), poolclass=NullPool)


def _run(url: str, fn, *args) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            fn(cfg, *args)
    finally:
        engine.dispose()


class ForeignSchema(Exception):
    """The database already holds tables cr_queue did not create (cr_hydra's, typically)."""


_FOREIGN = """
SELECT array_agg(tablename ORDER BY tablename) FROM pg_tables
WHERE schemaname = current_schema() AND tablename IN ('inversions', 'binary_data')
  AND NOT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'alembic_version')
"""


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    with psycopg.connect(url) as conn:
        foreign = conn.execute(_FOREIGN).fetchone()[0]
    if foreign:
        raise ForeignSchema(
            f"the database already has the tables {', '.join(foreign)} but no cr_queue schema: it looks "
            "like a cr_hydra database. cr_queue keeps its jobs in a database of its own: create one "
            "(e.g. `createdb crqueue`) and point --db at it; the old one stays as it is "
            "(see docs/migrating-from-cr_hydra.md)."
        )
    _run(url, command.upgrade, revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    _run(url, command.downgrade, revision)


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current_of(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current(url: str) -> str | None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return current_of(conn)
    finally:
        engine.dispose()
