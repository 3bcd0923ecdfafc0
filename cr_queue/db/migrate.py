"""Schema migrations through alembic, driven in code so installed copies need no alembic.ini.

alembic and SQLAlchemy are imported only when a migration function runs:
importing them cost every command a third of its start-up (0.3 s), and
commands check the schema version without them (cr_queue.database.ensure_schema
compares the database's revision with :func:`head`).  This module sends no
SQL of its own: alembic runs the migrations, and SQLAlchemy's inspector looks
at the tables before the first one.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from cr_queue import config
from cr_queue.db import connection
from cr_queue.db.connection import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import Connection


def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("cr_queue.db.migrations")))
    return cfg


def _engine(url: str, connect_timeout: int = config.DEFAULT_CONNECT_TIMEOUT):
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # A creator keeps libpq in charge of the URL: Unix-socket hosts, conninfo
    # strings and ~/.pgpass all work exactly as for the rest of cr_queue, and the
    # connection is opened the one way cr_queue opens them (connect timeout
    # included; a failure is a DatabaseError, which SQLAlchemy passes through).
    def creator():
        return connection.connect(url, application_name="cr_queue migrate", autocommit=False, connect_timeout=connect_timeout)

    return create_engine("postgresql+psycopg://", creator=creator, poolclass=NullPool)


def _run(url: str, fn, *args, connect_timeout: int = config.DEFAULT_CONNECT_TIMEOUT) -> None:
    engine = _engine(url, connect_timeout)
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            fn(cfg, *args)
    finally:
        engine.dispose()


class ForeignSchema(Exception):
    """The database already holds tables cr_queue did not create (cr_hydra's, typically)."""


# Tables of cr_hydra's schema: found without alembic's own table, the database is cr_hydra's.
_CR_HYDRA_TABLES = ("binary_data", "inversions")


class SchemaTooNew(DatabaseError):
    """The database's schema was made by a newer cr_queue than this one."""


def check_not_newer(have: str | None) -> None:
    """Raise :class:`SchemaTooNew` when ``have`` is a revision this cr_queue does not know.

    Such a schema was upgraded by a newer cr_queue: nothing here may touch it
    (an upgrade would fail, a downgrade would lose data), and the remedy is
    on this machine, not in the database."""
    if have is None or have == head() or _known(have):
        return
    raise SchemaTooNew(
        f"the database schema is {have}, newer than this cr_queue ({head()}): upgrade cr_queue here "
        "(pip install -U cr_queue, or the package of your distribution) to the version that made it"
    )


def _known(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except Exception:  # alembic's "Can't locate revision" (its error types vary between versions)
        return False


def upgrade(url: str, revision: str = "head", *, connect_timeout: int = config.DEFAULT_CONNECT_TIMEOUT) -> None:
    check_not_newer(current(url, connect_timeout=connect_timeout))
    _run(url, _upgrade_own_schema, revision, connect_timeout=connect_timeout)


def _upgrade_own_schema(cfg: Config, revision: str) -> None:
    """Upgrade, unless the tables there are another program's (cr_hydra's, typically)."""
    from alembic import command
    from sqlalchemy import inspect

    tables = inspect(cfg.attributes["connection"])
    if not tables.has_table("alembic_version"):
        foreign = [name for name in _CR_HYDRA_TABLES if tables.has_table(name)]
        if foreign:
            raise ForeignSchema(
                f"the database already has the tables {', '.join(foreign)} but no cr_queue schema: it looks "
                "like a cr_hydra database. cr_queue keeps its jobs in a database of its own: create one "
                "(e.g. `createdb crqueue`) and point --db at it; the old one stays as it is "
                "(see docs/migrating-from-cr_hydra.md)."
            )
    command.upgrade(cfg, revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    _run(url, command.downgrade, revision)


def head() -> str:
    """The newest migration's revision: the schema this version of cr_queue needs.

    Written out here, the one place the running code learns it: asking alembic
    would cost every command alembic's import, and reading the migration files
    would be a second reader of what alembic reads.  A new migration changes
    it; tests/test_migrations.py checks it is alembic's head.
    """
    return "0007"


def current_of(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current(url: str, *, connect_timeout: int = config.DEFAULT_CONNECT_TIMEOUT) -> str | None:
    engine = _engine(url, connect_timeout)
    try:
        with engine.connect() as conn:
            return current_of(conn)
    finally:
        engine.dispose()
