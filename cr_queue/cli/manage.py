"""crh_cancel, crh requeue and crh priority: changing jobs after they were added."""

from __future__ import annotations

import click

from cr_queue import manage
from cr_queue.cli.common import Output, db_option, fail, open_db, reports, select_jobs, targets_argument
from cr_queue.targets import select


@click.command("cancel")
@targets_argument
@db_option
@reports
def cancel_command(targets, db_url, out):
    """Cancel jobs, named by job id, tomodir or .crh file (a directory: every job below it).

    A queued job will not run; a running one is stopped by its worker within
    seconds.  crh_retrieve afterwards reports it and removes the .crh.
    """
    selection = select_jobs(targets)
    _settings, database = open_db(db_url)
    result = manage.cancel(database, selection)
    out.emit({"cancelled": result.ids, "problems": result.problems})
    for job_id in result.ids:
        out.line(f"cancelled job {job_id}")
    not_cancelled = len(selection.ids) - len(result.ids)
    out.line(
        f"{len(result.ids)} job(s) cancelled, {not_cancelled} not (already ended or unknown); "
        "crh_retrieve reports them and removes their .crh files"
    )
    _finish(out, result)


@click.command("requeue")
@click.argument("targets", nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed, not yet retrieved job of yours on this computer (or below TARGETS).")
@db_option
@reports
def requeue_command(targets, all_failed, db_url, out):
    """Send failed or cancelled jobs to the queue again (by job id, tomodir or .crh file).

    Solver failures are never retried automatically: fix the cause, then requeue.
    """
    if not targets and not all_failed:
        fail("name the jobs to requeue (job id, tomodir or .crh file), or use --failed")
    selection = select(list(targets)) if targets else None
    _settings, database = open_db(db_url)
    result = manage.requeue(database, selection, all_failed=all_failed)
    out.emit({"requeued": result.ids, "problems": result.problems})
    for job_id in result.ids:
        out.line(f"requeued job {job_id}")
    out.line(f"{len(result.ids)} job(s) requeued")
    _finish(out, result)


@click.command("priority")
@click.argument("priority", type=click.IntRange(-1_000_000, 1_000_000))
@targets_argument
@db_option
@reports
def priority_command(priority, targets, db_url, out):
    """Set the PRIORITY (higher runs first) of waiting jobs, named by job id, tomodir or .crh file."""
    selection = select_jobs(targets)
    _settings, database = open_db(db_url)
    result = manage.set_priority(database, selection, priority)
    out.emit({"changed": result.ids, "priority": priority, "problems": result.problems})
    out.line(f"priority {priority} set on {len(result.ids)} job(s)")
    _finish(out, result)


def _finish(out: Output, result: manage.Changed) -> None:
    for problem in result.problems:
        out.warn(problem)
    raise SystemExit(1 if result.problems else 0)
