"""crh db: schema migrations and the embedded database."""

from __future__ import annotations

import click

from cr_queue import config
from cr_queue.db import migrate
from cr_queue.database import open_database
from cr_queue.db.connection import Database, DatabaseError
from cr_queue.cli.common import db_option, fail, handle_errors, reports


@click.group("db")
def db_group():
    """Manage the database: schema upgrades and the embedded server."""


def _target(db_url: str | None) -> Database:
    settings = config.load(db=db_url)
    return open_database(settings, check_schema=False)


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target schema revision.")
@db_option
@reports
def upgrade(revision, db_url, out):
    """Create or upgrade the schema (run once per release, as the schema owner)."""
    database = _target(db_url)
    try:
        before = migrate.current(database.url)
        migrate.upgrade(database.url, revision)
        after = migrate.current(database.url)
    except migrate.SchemaTooNew:
        raise  # its remedy is on this machine, not the owner's
    except Exception as exc:
        raise DatabaseError(
            f"upgrading {database.redacted} failed: {_first_line(exc)}; run it as the database owner "
            "(with CREATEROLE the first time, to create the roles crh_admin, crh_worker, crh_user)"
        ) from None
    out.emit({"database": database.redacted, "from": before, "to": after})
    out.line(f"schema of {database.redacted}: {before or 'empty'} -> {after}")


@db_group.command("downgrade")
@click.argument("revision")
@db_option
@reports
def downgrade(revision, db_url, out):
    """Downgrade the schema to REVISION ('base' drops every cr_queue table and its data)."""
    database = _target(db_url)
    try:
        migrate.downgrade(database.url, revision)
    except Exception as exc:
        raise DatabaseError(
            f"downgrading {database.redacted} failed: {_first_line(exc)}; run it as the database owner"
        ) from None
    out.line(f"schema of {database.redacted} is now {migrate.current(database.url) or 'empty'}")


def _first_line(exc: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement dump and background links."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return config.redact(text.splitlines()[0] if text else type(exc).__name__)


def _cluster():
    from cr_queue.db import embedded

    return embedded.default_cluster()


@db_group.command("start")
@reports
def start(out):
    """Start the embedded database (commands also start it on demand)."""
    cluster = _cluster()
    cluster.start()
    migrate.upgrade(cluster.url)
    out.emit(cluster.status())
    out.line(f"embedded database running: {cluster.url}")


@db_group.command("stop")
@reports
def stop(out):
    """Stop the embedded database."""
    cluster = _cluster()
    was_running = cluster.is_running()
    cluster.stop()
    out.emit({"stopped": was_running})
    out.line("embedded database stopped" if was_running else "embedded database was not running")


@db_group.command("status")
@db_option
@reports
def status(db_url, out):
    """Where the database is, whether it runs, and its schema version."""
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


# ------------------------------------------------------------ roles of a shared database

_GRANTED = {
    "crh_user": "may add jobs and see, cancel, requeue and retrieve only the jobs it added itself",
    "crh_worker": "may claim and run any queued job and write results; it cannot delete jobs",
}


def _grant(name: str, group: str, db_url, out) -> None:
    from cr_queue.queries import roles

    try:
        roles.check_login_name(name)
    except roles.RoleError as exc:
        fail(str(exc))
    database = open_database(config.load(db=db_url))
    try:
        with database.connect("crh db grant") as conn:
            result = roles.grant(conn, name, group)
    except roles.RoleError as exc:
        fail(f"{database.redacted}: {exc}")
    out.emit(
        {
            "database": database.redacted,
            "role": result.name,
            "group": result.group,
            "created": result.created,
            "already_member": result.already_member,
            "can_login": result.can_login,
            "also_member_of": list(result.also),
        }
    )
    what = "created login role" if result.created else "role"
    verb = "was already a member of" if result.already_member else "is now a member of"
    out.line(f"{what} {name} {verb} {group} in {database.redacted}: it {_GRANTED[group]}.")
    if database.embedded:
        out.warn(
            "note: this is the embedded single-user database, reachable only by you; "
            "roles matter on a shared server (give it with --db or CRH_DATABASE_URL)"
        )
    if not result.can_login:
        out.warn(f"warning: {name} cannot log in (NOLOGIN); an admin can change that with ALTER ROLE {name} LOGIN")
    for other in result.also:
        out.warn(f"warning: {name} is also a member of {other}; a login should have one cr_queue role")
    if result.created:
        out.line(
            f"No password was set. Either authenticate {name} without one (peer on the database host, "
            f"or a TLS client certificate with CN={name}: see docs/security.md for the pg_hba.conf lines), "
            f"or set one in psql: `\\password {name}` (as an admin), or {name} runs `\\password` itself; "
            f"{name} then keeps it in ~/.pgpass (chmod 600), never in a URL or a shared file."
        )


def _grant_command(name: str, group: str, doc: str) -> click.Command:
    @db_group.command(name, help=doc)
    @click.argument("login", metavar="NAME")
    @db_option
    @reports
    def command(login, db_url, out):
        _grant(login, group, db_url, out)

    return command


grant_user = _grant_command(
    "grant-user",
    "crh_user",
    """Let the login NAME (a scientist) use the queue for its own jobs (role crh_user).

    Creates the login role if it does not exist (without a password) and
    grants it crh_user.  Run as a superuser or a role with CREATEROLE.
    """,
)
grant_worker = _grant_command(
    "grant-worker",
    "crh_worker",
    """Let the login NAME (a compute node's account) run jobs (role crh_worker).

    Creates the login role if it does not exist (without a password) and
    grants it crh_worker.  Run as a superuser or a role with CREATEROLE.
    """,
)
