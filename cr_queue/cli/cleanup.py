"""crh_cleanup: remove what nobody can use any more, after showing it and asking."""

from __future__ import annotations

import sys
from typing import Any

import click

from cr_queue import cleanup, config
from cr_queue.cli import fmt
from cr_queue.cli.common import Output, db_option, fail, open_db, reports

SHOWN = 20  # jobs listed per kind in the text report (all of them are in --json)

class KeepDuration(click.ParamType):
    """A duration of at least 0 (0: at once): 30d, 12h, 90m, 3600 (seconds), 1d12h."""

    name = "duration"

    def convert(self, value, param, ctx):
        seconds = config.parse_duration(value)
        if seconds is None:
            self.fail(f"{value!r} is not a duration; write e.g. 30d, 12h, 90m, 3600 (seconds) or 0 (at once)", param, ctx)
        return seconds


_TITLES = {
    "stuck_registering": "stuck registrations (left by an interrupted crh_add more than an hour ago)",
    "expired": "ended jobs never retrieved within {days:g} days",
    "crh_missing": "jobs from this computer whose .crh file is gone",
}


@click.command("cleanup")
@click.option("--dry-run", "-n", is_flag=True, help="Only report what would be deleted.")
@click.option("--yes", "-y", is_flag=True, help="Delete without asking (needed when not on a terminal).")
@click.option(
    "--retention",
    "retention_days",
    type=click.FloatRange(min=0, min_open=True),
    default=cleanup.DEFAULT_RETENTION_DAYS,
    show_default=True,
    metavar="DAYS",
    help="Ended jobs nobody retrieved are purged this many days after they ended.",
)
@click.option(
    "--keep-retrieved",
    "keep_retrieved_s",
    type=KeepDuration(),
    default=None,
    metavar="DURATION",
    help="Purge the archives of jobs retrieved longer ago than this (30d, 12h, 0: at once); their rows and "
    "events stay.  [default: [cleanup] keep_retrieved in the config, else 30d]",
)
@click.option(
    "--only",
    "kinds",
    type=click.Choice(cleanup.KINDS),
    multiple=True,
    help="Clean up only this kind (repeatable): " + ", ".join(cleanup.KINDS) + ".",
)
@db_option
@reports
def cleanup_command(dry_run, yes, retention_days, keep_retrieved_s, kinds, db_url, out):
    """Remove what nobody can use any more, and report the bytes freed:

    \b
    - archives no job refers to, and uploads interrupted more than an hour ago;
    - jobs from this computer whose .crh file no longer exists (not retrieved,
      not running; run this on the computer the jobs were added from);
    - finished, failed or cancelled jobs nobody retrieved within --retention
      days (jobs due within the next week are listed as a warning);
    - jobs stuck in 'registering' for more than an hour;
    - the input and result archives of jobs retrieved more than
      --keep-retrieved ago (the jobs and their history stay; crh show says
      when the archives were purged).

    Archives the deleted and purged jobs release go in the same run; any
    other archive no job refers to goes once sealed more than an hour ago
    (the grace that protects an upload whose job is still being registered).

    Run with --dry-run first.  Without it, cleanup asks on a terminal, or
    takes --yes; a job's archive is kept while any other job still uses it.
    If you moved a tree of tomodirs, its jobs show up as "gone": answer no.
    """
    settings, database = open_db(db_url)
    keep = config.keep_retrieved_s(settings) if keep_retrieved_s is None else keep_retrieved_s
    options = cleanup.CleanupOptions(retention_days=retention_days, kinds=tuple(kinds) or cleanup.KINDS, keep_retrieved_s=keep)
    with database.connect("crh_cleanup") as conn:
        try:
            plan = cleanup.plan(conn, options, database.store)
        except cleanup.CleanupError as exc:
            fail(str(exc))
        _report_plan(plan, out)
        if plan.empty:
            out.emit({"dry_run": dry_run, "applied": False, "plan": plan.as_dict(), "result": None})
            out.line("nothing to clean up")
            _finish(plan.problems, out)
        if dry_run:
            out.emit({"dry_run": True, "applied": False, "plan": plan.as_dict(), "result": None})
            out.line(f"dry run: nothing deleted; `crh cleanup --yes` deletes {_what(plan)}")
            _finish(plan.problems, out)
        if not yes:
            if not sys.stdin.isatty():
                fail(
                    f"not deleting {_what(plan)} without confirmation, and there is no terminal to ask on. "
                    "Run `crh cleanup --dry-run` to see what would go, then `crh cleanup --yes` to delete it"
                )
            if not click.confirm(f"Delete {_what(plan)}?", default=False, err=True):
                out.emit({"dry_run": False, "applied": False, "plan": plan.as_dict(), "result": None})
                out.line("nothing deleted")
                _finish(plan.problems, out)
        result = cleanup.apply(conn, plan, database.store)
    out.emit({"dry_run": False, "applied": True, "plan": plan.as_dict(), "result": result.as_dict()})
    _report_result(result, out)
    _finish(plan.problems + result.problems, out)


def _what(plan: cleanup.Plan) -> str:
    purge = f" (those of {fmt.plural(len(plan.purge), 'retrieved job')} included)" if plan.purge else ""
    return f"{fmt.plural(plan.n_jobs, 'job')} and {fmt.plural(len(plan.blobs), 'archive')} ({fmt.size(plan.blob_bytes)}){purge}"


def _finish(problems: list[str], out: Output) -> None:
    for problem in problems:
        out.warn(problem)
    raise SystemExit(1 if problems else 0)


def _job_line(job: dict[str, Any]) -> str:
    line = f"  job {job['id']} {job['status']}  {job['username']}@{job['source_computer']}  {job['source_path']}"
    return line + (f"  ({job['why']})" if job.get("why") else f"  (since {fmt.when(job['since'])})")


def _report_plan(plan: cleanup.Plan, out: Output) -> None:
    for kind, jobs in plan.jobs.items():
        if not jobs:
            continue
        out.line(f"{_TITLES[kind].format(days=plan.options.retention_days)}: {len(jobs):,}")
        for job in jobs[:SHOWN]:
            out.line(_job_line(job))
        if len(jobs) > SHOWN:
            out.line(f"  ... and {len(jobs) - SHOWN:,} more (--json lists all)")
    if plan.purge:
        keep = plan.options.keep_retrieved_s
        when = f"more than {fmt.duration(keep)} ago" if keep else "(--keep-retrieved 0: at once)"
        out.line(
            f"jobs retrieved {when} whose archives are purged (the jobs and their history stay): {len(plan.purge):,}"
        )
        for job in plan.purge[:SHOWN]:
            out.line(_job_line({**job, "why": f"retrieved {fmt.when(job['since'])}"}))
        if len(plan.purge) > SHOWN:
            out.line(f"  ... and {len(plan.purge) - SHOWN:,} more (--json lists all)")
    if plan.blobs:
        orphans = sum(1 for b in plan.blobs if b["complete"])
        partial = len(plan.blobs) - orphans
        out.line(
            f"archives no job needs: {len(plan.blobs):,} ({fmt.size(plan.blob_bytes)}): "
            f"{orphans:,} no job refers to (those of the jobs above included), {partial:,} interrupted uploads"
        )
    if "blobs" in plan.options.kinds:
        held = plan.held_back
        grace = fmt.duration(plan.options.blob_grace_s)
        out.line(
            f"grace: an archive no job refers to is kept until {grace} after its upload (its job may still be "
            "registering), unless a job of this run released it"
            + (f"; held back now: {fmt.plural(len(held), 'archive')} ({fmt.size(sum(b['bytes'] for b in held))})" if held else "")
        )
    if plan.expiring:
        out.warn(
            f"warning: {fmt.plural(len(plan.expiring), 'ended job')} not yet retrieved will be purged "
            f"within the next {cleanup.WARN_DAYS} days; retrieve them with crh_retrieve:"
        )
        for job in plan.expiring[:SHOWN]:
            out.warn(
                f"  job {job['id']} {job['status']}  {job['username']}@{job['source_computer']}  "
                f"{job['source_path']}  (purged after {fmt.when(job['purge_after'])})"
            )
        if len(plan.expiring) > SHOWN:
            out.warn(f"  ... and {len(plan.expiring) - SHOWN:,} more (--json lists all)")


def _report_result(result: cleanup.Result, out: Output) -> None:
    kept = len(result.kept_jobs) + len(result.kept_blobs)
    purged = f", purged the archives of {fmt.plural(len(result.purged_jobs), 'retrieved job')}" if result.purged_jobs else ""
    out.line(
        f"deleted {fmt.plural(len(result.deleted_jobs), 'job')}{purged} and {fmt.plural(len(result.deleted_blobs), 'archive')}: "
        f"freed {fmt.size(result.bytes_freed)} of archives"
        + (f", {fmt.plural(result.files_removed, 'file')} from the shared store" if result.files_removed else "")
        + (f"; kept {kept:,} that changed since the check" if kept else "")
    )
    before, after = result.store_size_before.get("binary_data"), result.store_size_after.get("binary_data")
    out.line(
        f"binary_data on disk: {fmt.size(before)} before, {fmt.size(after)} now "
        "(PostgreSQL reuses the freed space for new archives once (auto)vacuum has passed; to give it back "
        "to the system see docs/admin.md, VACUUM FULL or pg_repack)"
    )


def main() -> None:
    """The `crh_cleanup` console script; lives here, not in cli/main.py, so it imports only what it needs."""
    cleanup_command.main(prog_name="crh_cleanup", help_option_names=["-h", "--help"])
