"""crh db: schema migrations and the embedded database."""

from __future__ import annotations

import click

from .. import config, migrate
from ..db import Database, DatabaseError, open_database
from .common import Output, db_option, handle_errors, output_options, setup_logging


@click.group("db")
def db_group():
    """Manage the database: schema upgrades and the embedded server."""


def _target(db_url: str | None) -> Database:
    settings = config.load(db=db_url)
    return open_database(settings, check_schema=False)


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target schema revision.")
@db_option
@output_options
@handle_errors
def upgrade(revision, db_url, as_json, quiet, log_level):
    """Create or upgrade the schema (run once per release, as the schema owner)."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    database = _target(db_url)
    try:
        before = migrate.current(database.url)
        migrate.upgrade(database.url, revision)
        after = migrate.current(database.url)
    except Exception as exc:
        raise DatabaseError(f"upgrading {database.redacted} failed: {config.redact(str(exc))}") from None
    out.emit({"database": database.redacted, "from": before, "to": after})
    out.line(f"schema of {database.redacted}: {before or 'empty'} -> {after}")


@db_group.command("downgrade")
@click.argument("revision")
@db_option
@output_options
@handle_errors
def downgrade(revision, db_url, as_json, quiet, log_level):
    """Downgrade the schema to REVISION ('base' drops every cr_queue table and its data)."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    database = _target(db_url)
    migrate.downgrade(database.url, revision)
    out.line(f"schema of {database.redacted} is now {migrate.current(database.url) or 'empty'}")


def _cluster():
    from .. import embedded

    return embedded.default_cluster()


@db_group.command("start")
@output_options
@handle_errors
def start(as_json, quiet, log_level):
    """Start the embedded database (commands also start it on demand)."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    cluster = _cluster()
    cluster.start()
    migrate.upgrade(cluster.url)
    out.emit(cluster.status())
    out.line(f"embedded database running: {cluster.url}")


@db_group.command("stop")
@output_options
@handle_errors
def stop(as_json, quiet, log_level):
    """Stop the embedded database."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    cluster = _cluster()
    was_running = cluster.is_running()
    cluster.stop()
    out.emit({"stopped": was_running})
    out.line("embedded database stopped" if was_running else "embedded database was not running")


@db_group.command("status")
@db_option
@output_options
@handle_errors
def status(db_url, as_json, quiet, log_level):
    """Where the database is, whether it runs, and its schema version."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    settings = config.load(db=db_url)
    info: dict = {"source": settings.database_source}
    if settings.database_url is None:
        info.update(_cluster().status())
        url = info.get("url") if info.get("running") else None
    else:
        url = settings.database_url
        info["url"] = config.redact(url)
    if url:
        try:
            info["schema"] = migrate.current(url)
        except Exception as exc:
            info["error"] = config.redact(str(exc).splitlines()[0])
    info["schema_expected"] = migrate.head()
    out.emit(info)
    for key, value in info.items():
        out.line(f"{key}: {value}")


@db_group.command("url")
@db_option
@handle_errors
def url(db_url):
    """Print the database URL (password hidden), starting the embedded database if it is the one."""
    database = _target(db_url)
    click.echo(database.redacted)
