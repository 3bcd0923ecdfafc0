"""crh_cancel and crh requeue: changing jobs after they were added."""

from __future__ import annotations

import click

from cr_queue.targets import Selection, select
from cr_queue.queries import jobs
from cr_queue.cli.common import (
    Output,
    db_option,
    fail,
    handle_errors,
    open_db,
    output_options,
    select_jobs,
    setup_logging,
)


@click.command("cancel")
@click.argument("targets", nargs=-1, required=True)
@db_option
@output_options
@handle_errors
def cancel_command(targets, db_url, as_json, quiet, log_level):
    """Cancel jobs, named by job id, tomodir or .crh file (a directory: every job below it).

    A queued job will not run; a running one is stopped by its worker within
    seconds.  crh_retrieve afterwards reports it and removes the .crh.
    """
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    selection = select_jobs(targets)
    _settings, database = open_db(db_url)
    with database.connect("crh_cancel") as conn:
        cancelled = jobs.cancel(conn, selection.ids, jobs.Actor())
        known = jobs.get_jobs(conn, selection.ids)
    not_cancelled = [i for i in selection.ids if i not in cancelled]
    problems = list(selection.problems)
    for job_id in not_cancelled:
        job = known.get(job_id)
        problems.append(
            f"job {job_id}: not in the database {database.redacted} (or another login's job)"
            if job is None
            else f"job {job_id}: already {job.status}, nothing to cancel"
        )
    out.emit({"cancelled": cancelled, "problems": problems})
    for job_id in cancelled:
        out.line(f"cancelled job {job_id}")
    for problem in problems:
        out.warn(problem)
    raise SystemExit(1 if problems else 0)


@click.command("requeue")
@click.argument("targets", nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed, not yet retrieved job of yours on this computer (or below TARGETS).")
@db_option
@output_options
@handle_errors
def requeue_command(targets, all_failed, db_url, as_json, quiet, log_level):
    """Send failed or cancelled jobs to the queue again (by job id, tomodir or .crh file).

    Solver failures are never retried automatically: fix the cause, then requeue.
    """
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    if not targets and not all_failed:
        fail("name the jobs to requeue (job id, tomodir or .crh file), or use --failed")
    selection = select(list(targets)) if targets else Selection()
    _settings, database = open_db(db_url)
    actor = jobs.Actor()
    with database.connect("crh_requeue") as conn:
        ids = selection.ids
        if all_failed:
            mine = jobs.failed_of(conn, actor.os_user, actor.host)
            ids = [i for i in mine if not targets or i in set(selection.ids)]
        requeued = jobs.requeue(conn, ids, actor)
        known = jobs.get_jobs(conn, ids)
    problems = list(selection.problems)
    for job_id in ids:
        if job_id not in requeued:
            job = known.get(job_id)
            problems.append(
                f"job {job_id}: not in the database {database.redacted} (or another login's job)"
                if job is None
                else f"job {job_id}: is {job.status}{' and already retrieved' if job.downloaded else ''}; "
                "only failed or cancelled jobs not yet retrieved can be requeued (re-add retrieved ones with crh_add)"
            )
    out.emit({"requeued": requeued, "problems": problems})
    for job_id in requeued:
        out.line(f"requeued job {job_id}")
    out.line(f"{len(requeued)} job(s) requeued")
    for problem in problems:
        out.warn(problem)
    raise SystemExit(1 if problems else 0)


@click.command("priority")
@click.argument("priority", type=click.IntRange(-1_000_000, 1_000_000))
@click.argument("targets", nargs=-1, required=True)
@db_option
@output_options
@handle_errors
def priority_command(priority, targets, db_url, as_json, quiet, log_level):
    """Set the PRIORITY (higher runs first) of waiting jobs, named by job id, tomodir or .crh file."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    selection = select_jobs(targets)
    _settings, database = open_db(db_url)
    with database.connect("crh_priority") as conn:
        changed = jobs.set_priority(conn, selection.ids, priority, jobs.Actor())
    problems = selection.problems + [
        f"job {i}: not waiting or running (or not in {database.redacted}); its priority was not changed"
        for i in selection.ids
        if i not in changed
    ]
    out.emit({"changed": changed, "priority": priority, "problems": problems})
    out.line(f"priority {priority} set on {len(changed)} job(s)")
    for problem in problems:
        out.warn(problem)
    raise SystemExit(1 if problems else 0)
