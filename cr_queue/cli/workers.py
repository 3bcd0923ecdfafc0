"""crh worker list|drain|stop and crh node set|list|unset: the worker registry and remote control.

``crh worker`` stays the command that runs the daemon (``crh worker --jobs 2
...`` works exactly like ``crh_worker --jobs 2 ...``): it is made a click
group that runs the daemon when no subcommand is given, built from the
daemon command itself, so options added to the daemon appear here too.
"""

from __future__ import annotations

import functools
import inspect

import click
import psycopg

from cr_queue import admin
from cr_queue.cli import fmt
from cr_queue.cli.common import db_option, fail, open_db, reports
from cr_queue.cli.status import worker_table


def admin_only(what: str):
    """Turn the database's refusal into the remedy: these changes are for crh_admin members."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except psycopg.errors.InsufficientPrivilege as exc:
                fail(
                    f"{what} is for admins and the database refused it ({exc.diag.message_primary}): "
                    "connect as the database owner or as a login that is a member of crh_admin "
                    "(GRANT crh_admin TO NAME)"
                )

        return wrapper

    return decorate


def worker_group_for(daemon: click.Command) -> click.Group:
    """``crh worker``: the daemon when given no subcommand, else list/drain/stop."""

    @click.pass_context
    def run_daemon(ctx: click.Context, **kwargs):
        if ctx.invoked_subcommand is None:
            return daemon.callback(**kwargs)
        return None

    group = click.Group(
        name=daemon.name,
        params=list(daemon.params),
        callback=run_daemon,
        invoke_without_command=True,
        help=inspect.cleandoc(daemon.help or "")
        + "\n\nWith a subcommand, manage workers instead: `crh worker list`, `crh worker drain NAME`, "
        "`crh worker stop NAME` (they act through the database, on any node).",
        subcommand_metavar="[list|drain|stop ...]",
        epilog=daemon.epilog,
    )
    group.add_command(worker_list_command)
    group.add_command(worker_drain_command)
    group.add_command(worker_stop_command)
    return group


@click.command("list")
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped workers (default: live ones and those stopped in the last hour).")
@db_option
@reports
def worker_list_command(include_stopped, db_url, out):
    """List the registered workers: host, pid, state, last heartbeat, jobs held, solvers, CPU budget."""
    _settings, database = open_db(db_url)
    with database.connect("crh_worker_list") as conn:
        workers = admin.list_workers(conn, include_stopped=include_stopped)
    out.emit({"workers": workers})
    if workers:
        for line in worker_table(workers, out):
            out.line(line)
    else:
        out.line("no workers" + ("" if include_stopped else " running (--all shows stopped ones)"))


def _request_command(request: str, doc: str) -> click.Command:
    @click.command(request, help=doc)
    @click.argument("targets", nargs=-1)
    @click.option("--host", "hosts", multiple=True, help="Every running worker on this host (repeatable).")
    @db_option
    @reports
    @admin_only(f"crh worker {request}")
    def command(targets, hosts, db_url, out):
        if not targets and not hosts:
            fail(f"name the workers to {request} (name or id, see `crh worker list`), or give --host HOST")
        _settings, database = open_db(db_url)
        with database.connect(f"crh_worker_{request}") as conn:
            result = admin.request(conn, request, list(targets), list(hosts))
        out.emit(result.as_dict())
        for w in result.changed:
            note = ""
            if w["heartbeat_age_s"] is not None and w["heartbeat_age_s"] > 60:
                note = f" (its last heartbeat was {fmt.duration(w['heartbeat_age_s'])} ago: it may be gone)"
            out.line(f"asked worker {w['name']} (id {w['id']}) on {w['host']} to {request}{note}")
        for w in result.unchanged:
            out.line(f"worker {w['name']} (id {w['id']}) on {w['host']}: {w['why']}, left so")
        for problem in result.problems:
            out.warn(problem)
        raise SystemExit(1 if result.problems else 0)

    return command


worker_drain_command = _request_command(
    "drain",
    """Ask workers to drain: claim nothing more, finish their running jobs, then exit.

    TARGETS are worker names or ids (`crh worker list`); a name used by
    several workers over time reaches every one not yet stopped.  The
    worker reads the request with its next heartbeat, on whatever node it runs.
    """,
)
worker_stop_command = _request_command(
    "stop",
    """Ask workers to stop now: give their running jobs back to the queue and exit.

    TARGETS are worker names or ids (`crh worker list`).  The jobs go back
    without using up a try and another worker takes them.  A stop request
    overrides an earlier drain request.
    """,
)


# ---------------------------------------------------------------------- nodes


@click.group("node")
def node_group():
    """Per-host settings kept in the database (cr_hydra's node_settings).

    A worker on HOST uses them: nice level of the solvers, CPUs it may
    use, OpenMP threads per job, and whether the host takes jobs at all.
    """


@node_group.command("set")
@click.argument("host")
@click.option("--nice", type=click.IntRange(0, 19), default=None, help="Nice level of the solvers on this host.")
@click.option("--cpus", type=click.IntRange(min=1), default=None, help="CPUs the workers on this host may use.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="OpenMP threads per job on this host.")
@click.option("--active/--inactive", default=None, help="Whether workers on this host take jobs (new hosts: active).")
@db_option
@reports
@admin_only("crh node set")
def node_set_command(host, nice, cpus, threads, active, db_url, out):
    """Set HOST's settings; only the values given change."""
    _settings, database = open_db(db_url)
    with database.connect("crh_node_set") as conn:
        row = admin.node_set(conn, host, nice=nice, cpus=cpus, threads=threads, active=active)
    out.emit({"node": row})
    out.line(_node_line(row))


@node_group.command("unset")
@click.argument("host")
@click.option("--nice", is_flag=True, help="Clear only the nice level.")
@click.option("--cpus", is_flag=True, help="Clear only the CPU count.")
@click.option("--threads", is_flag=True, help="Clear only the thread count.")
@db_option
@reports
@admin_only("crh node unset")
def node_unset_command(host, nice, cpus, threads, db_url, out):
    """Forget HOST's settings (workers there use their own options), or clear single values."""
    _settings, database = open_db(db_url)
    with database.connect("crh_node_unset") as conn:
        try:
            row = admin.node_unset(conn, host, nice=nice, cpus=cpus, threads=threads)
        except LookupError:
            fail(f"no settings stored for host {host!r}; `crh node list` shows the hosts that have some", 1)
    out.emit({"host": host, "node": row, "removed": row is None})
    out.line(f"settings of {host} removed" if row is None else _node_line(row))


@node_group.command("list")
@db_option
@reports
def node_list_command(db_url, out):
    """List the hosts with stored settings and how many live workers each has."""
    _settings, database = open_db(db_url)
    with database.connect("crh_node_list") as conn:
        rows = admin.node_list(conn)
    out.emit({"nodes": rows})
    if not rows:
        out.line("no node settings stored (crh node set HOST ... adds some)")
        return
    for line in fmt.table(
        ["HOST", "ACTIVE", "NICE", "CPUS", "THREADS", "LIVE WORKERS", "UPDATED"],
        [
            [r["host"], "yes" if r["active"] else "no", r["nice"], r["cpus"], r["threads"], r["live_workers"], fmt.when(r["updated"])]
            for r in rows
        ],
        indent="",
    ):
        out.line(line)


def _node_line(row: dict) -> str:
    values = ", ".join(f"{k} {'-' if row[k] is None else row[k]}" for k in ("nice", "cpus", "threads"))
    return f"{row['host']}: {'active' if row['active'] else 'inactive'}, {values}"
