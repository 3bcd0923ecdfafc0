"""Schema migrations through alembic, driven in code so installed copies need no alembic.ini."""

from __future__ import annotations

from importlib import resources

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("cr_queue.migrations")))
    return cfg


def _engine(url: str):
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


def upgrade(url: str, revision: str = "head") -> None:
    _run(url, command.upgrade, revision)


def downgrade(url: str, revision: str = "base") -> None:
    _run(url, command.downgrade, revision)


def head() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_of(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current(url: str) -> str | None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return current_of(conn)
    finally:
        engine.dispose()
