"""Alembic environment: runs on the connection cr_queue hands over.

cr_queue calls alembic programmatically (``crh db upgrade``), passing an open
SQLAlchemy connection in ``config.attributes["connection"]`` so that the same
libpq URL handling (Unix sockets, conninfo strings, .pgpass) applies as
everywhere else.  Running ``alembic`` by hand needs ``-x url=...``.
"""

from alembic import context
from sqlalchemy import create_engine

from cr_queue.db.schema import metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("alembic: give the database with -x url=postgresql+psycopg://...")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
