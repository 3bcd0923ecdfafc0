"""crh web: the queue and the inversions at a glance, in a browser (read-only)."""

from __future__ import annotations

import importlib.util

import click

from cr_queue.cli.common import db_option, fail, handle_errors, open_db, setup_logging

# What the web needs beyond the commands (the optional extra cr_queue[web]).
NEEDS = ("bottle", "waitress", "jinja2", "matplotlib", "numpy")


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback serves the pages to the network (put it behind a proxy with authentication, see docs/deployment.md).")
@click.option("--port", type=click.IntRange(0, 65535), default=8321, show_default=True, help="Port to listen on (0: any free port; the URL is printed).")
@db_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="Detail of the diagnostic log on stderr.",
)
@handle_errors
def web_command(host, port, db_url, log_level):
    """Serve a read-only web view of the queue: an overview that updates
    itself, the job list, each job's history and what it computed (RMS per
    iteration, the final model over the mesh, CRMod's readings, why it
    failed), and a sipdir's frequencies side by side.

    It connects with your own database login, so it shows what you may see:
    your jobs and the queue's totals, or everything for an admin.  Nothing
    on the pages changes anything.  Ctrl-C stops it.
    """
    setup_logging(log_level)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        fail(
            f"crh web needs {', '.join(missing)}, which are not installed: "
            "pip install 'cr_queue[web]' (on Debian: apt install cr-queue-web)"
        )
    from cr_queue.web import server

    _settings, database = open_db(db_url)

    def ready(serving: server.Serving) -> None:
        who = "every job" if serving.privileged else "its own jobs and the queue's totals"
        click.echo(f"crh web: {serving.url}")
        click.echo(f"  database {database.redacted} ({database.source}), login {serving.login}: {who}; read-only")
        if not serving.loopback_only:
            click.echo(
                f"  listening on {host}: anyone who reaches this port sees what {serving.login} sees; "
                "serve it behind a proxy with authentication (docs/deployment.md)",
                err=True,
            )
        click.echo("  Ctrl-C stops it.")

    try:
        server.serve(database, host=host, port=port, on_ready=ready)
    except server.WebError as exc:
        fail(str(exc))
