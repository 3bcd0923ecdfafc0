"""crh_worker: the daemon that runs the solvers on a compute node."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from cr_queue import config
from cr_queue.solvers import solvers
from cr_queue import worker as worker_service
from cr_queue.cli.common import DURATION, GROUP, LABEL, db_option, open_db, reports


@click.command("worker")
@click.option("--jobs", "-j", type=click.IntRange(1, 4096), default=1, show_default=True, help="Jobs run at the same time.")
@click.option("--threads", "-t", type=click.IntRange(1, 4096), default=1, show_default=True, help="OMP_NUM_THREADS for each solver.")
@click.option("--quit-when-empty", "-q", "--quit", "quit_when_empty", is_flag=True, help="Exit once no job is left to claim.")
@click.option("--name", type=LABEL, default=None, help="Worker name shown in status (default HOST-PID).")
@click.option("--group", "groups", type=GROUP, multiple=True, help="Only take jobs of this group (repeatable); without it, only jobs without a group.")
@click.option("--crtomo", default=None, metavar="PATH", help="CRTomo binary (else CRH_CRTOMO, [solvers] crtomo, or CRTomo on PATH).")
@click.option("--crmod", default=None, metavar="PATH", help="CRMod binary (else CRH_CRMOD, [solvers] crmod, or CRMod on PATH).")
@click.option("--timeout", "timeout_s", type=DURATION, default=None, help="Default solver time limit for jobs that set none (e.g. 90s, 2h).")
@click.option("--lease", "lease_s", type=click.FloatRange(3, 86400), default=30.0, show_default=True, help="Lease length in seconds; renewed every third of it.")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between polls when no NOTIFY arrives.")
@click.option("--drain-timeout", "drain_timeout_s", type=DURATION, default=None, help="On SIGTERM, wait this long for running jobs before giving them back (e.g. 10m; default: wait).")
@click.option("--max-runtime", "max_runtime_s", type=DURATION, default=None, help="Pilot mode: stop claiming before this much time (e.g. 23h30m) and give back what cannot finish.")
@click.option("--max-node-failures", type=click.IntRange(min=1), default=5, show_default=True, help="Stop claiming after this many jobs in a row fail here for node reasons.")
@click.option("--cpus", type=click.IntRange(1, 65536), default=None, help="CPU budget: run as many jobs at once as their threads fit in (overrides --jobs).")
@click.option("--nice", type=click.IntRange(0, 19), default=0, show_default=True, help="Nice level of the solvers.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where private job directories are made (default: the system temp dir).")
@db_option
@reports
def worker_command(jobs, threads, quit_when_empty, name, groups, crtomo, crmod, timeout_s, lease_s, poll_s, drain_timeout_s, max_runtime_s, max_node_failures, cpus, nice, workdir, db_url, out):
    """Claim jobs from the queue and run CRMod/CRTomo on them.

    SIGTERM or Ctrl-C: stop claiming and let running jobs finish; a second
    one gives the running jobs back to the queue at once.
    """
    settings, database = open_db(db_url, crtomo=crtomo, crmod=crmod)
    solver_map = solvers.resolve(
        {
            "crtomo": (settings.crtomo, _origin("crtomo", crtomo)),
            "crmod": (settings.crmod, _origin("crmod", crmod)),
        }
    )
    if workdir is not None and not workdir.is_dir():
        raise click.BadParameter(f"{workdir} is not a directory; create it or choose another", param_hint="--workdir")
    options = worker_service.WorkerOptions(
        jobs=jobs,
        threads=threads,
        name=name,
        quit_when_empty=quit_when_empty,
        groups=tuple(groups),
        lease_s=lease_s,
        poll_s=poll_s,
        timeout_s=timeout_s,
        drain_timeout_s=drain_timeout_s,
        max_runtime_s=max_runtime_s,
        max_node_failures=max_node_failures,
        nice=nice,
        cpus=cpus,
        workdir=workdir,
    )
    events: list[str] = []

    def on_event(message: str) -> None:
        logging.getLogger("cr_queue.worker").info("%s", message)
        events.append(message) if out.json else out.line(message)

    w = worker_service.Worker(database, solver_map, options, limits=config.archive_limits(settings), on_event=on_event)
    w.install_signal_handlers()
    code = w.run()
    out.emit(
        {
            "worker_id": w.worker_id,
            "name": w.name,
            "finished": w.tally.finished,
            "failed": w.tally.failed,
            "released": w.tally.released,
            "refused": w.tally.refused,
            "cancelled": w.tally.cancelled,
            "stop_reason": w.stop_reason,
            "events": events,
        }
    )
    raise SystemExit(code)


def _origin(name: str, option: str | None) -> str:
    if option:
        return f"--{name}"
    if os.environ.get(f"CRH_{name.upper()}"):
        return f"CRH_{name.upper()}"
    return f"[solvers] {name} in the config"
