"""crh_add: register every tomodir under the given paths."""

from __future__ import annotations

from pathlib import Path

import click

from cr_queue import add as add_service
from cr_queue.cli.common import DURATION, GROUP, Output, db_option, fail, open_db, reports
from cr_queue.util.imports import command_process


@click.command("add")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Register again even where a .crh file exists.")
@click.option("--dry-run", "-n", is_flag=True, help="List what would be queued; change nothing.")
@click.option("--priority", type=click.IntRange(-1_000_000, 1_000_000), default=0, show_default=True, help="Higher runs first.")
@click.option("--group", type=GROUP, default=None, help="Queue group; only workers of this group take the jobs.")
@click.option("--threads", type=click.IntRange(1, 4096), default=1, show_default=True, help="OpenMP threads per job.")
@click.option("--timeout", "timeout_s", type=DURATION, default=None, help="Kill the solver after this long (e.g. 90s, 2h, 1d).")
@click.option("--max-attempts", type=click.IntRange(1, 1000), default=3, show_default=True, help="Tries before a job whose worker keeps dying fails.")
@click.option("--local", is_flag=True, help="Run the jobs on this machine now (private group, local worker), then retrieve.")
@click.option("--local-jobs", type=click.IntRange(min=1), default=None, help="Jobs at once in --local mode (default: CPUs / --threads).")
@click.option("--crtomo", default=None, metavar="PATH", help="CRTomo binary for --local.")
@click.option("--crmod", default=None, metavar="PATH", help="CRMod binary for --local.")
@db_option
@reports
def add_command(paths, force, dry_run, priority, group, threads, timeout_s, max_attempts, local, local_jobs, crtomo, crmod, db_url, out):
    """Register tomodirs below PATHS (default: the current directory) for a worker to run.

    Writes TOMODIR.crh beside each registered tomodir; the tomodir itself is
    never changed.  Run crh_retrieve in the same tree later.
    """
    paths = list(paths) or [Path(".")]
    for path in paths:
        # A mistyped path is a usage error: register nothing rather than half of what was meant.
        if not path.exists():
            fail(f"{path}: no such directory; check the path (crh_add takes directories holding tomodirs)")
        if not path.is_dir():
            fail(f"{path}: not a directory; give the tomodir or a directory above it")
    if local and group and not dry_run:
        fail("--local puts the jobs in a private group of their own; leave out --group")
    options = add_service.AddOptions(
        force=force,
        dry_run=dry_run,
        priority=priority,
        group=group,
        threads=threads,
        timeout_s=int(timeout_s) if timeout_s is not None else None,
        max_attempts=max_attempts,
    )
    try:
        found = add_service.find(paths)
        if local and not dry_run:
            _run_local(out, paths, options, found, local_jobs, crtomo, crmod, db_url)
            return
        if out.interactive and found.todo and not dry_run:
            with click.progressbar(length=len(found.todo), label="adding", file=click.get_text_stream("stderr")) as bar:
                report = _add(paths, options, found, db_url, lambda _item: bar.update(1))
        else:
            report = _add(paths, options, found, db_url, lambda item: out.line(_queued(item)))
    except KeyboardInterrupt:
        # Ctrl-C before any registration began (registrations report their own interruption).
        out.warn("interrupted before anything was registered; nothing was queued")
        raise SystemExit(add_service.INTERRUPTED) from None
    if not found.todo and not found.done and not found.incomplete and not found.errors:
        out.warn(
            f"no tomodir found below {', '.join(map(str, paths))}: a tomodir is a directory holding exe/, config/, "
            "rho/, mod/ and inv/; run crh_add in the directory above your tomodirs, or name them"
        )
    _print(out, report, dry_run)
    raise SystemExit(report.exit_code)


def _add(paths, options, found, db_url, progress) -> add_service.AddReport:
    return add_service.run(
        found, paths, options, open_database=lambda: open_db(db_url)[1], progress=progress, may_fork=command_process()
    )


def _queued(item: add_service.Added) -> str:
    return (
        f"{'resumed' if item.resumed else 'queued'} job {item.job_id} "
        f"({'+'.join(item.steps)}, {item.size / 1e6:.1f} MB): {item.path}"
    )


def _print(out: Output, report: add_service.AddReport, dry_run: bool) -> None:
    out.emit(
        {
            "dry_run": dry_run,
            "added": [
                {
                    "path": str(a.path),
                    "job_id": a.job_id,
                    "sim_type": a.sim_type,
                    "steps": list(a.steps),
                    "size": a.size,
                    "resumed": a.resumed,
                }
                for a in report.added
            ],
            "skipped": [{"path": str(p), "reason": r} for p, r in report.skipped],
            "done": [str(p) for p in report.done],
            "problems": report.problems,
            "interrupted": report.interrupted,
            "left_registering": [{"path": str(p), "job_id": j} for p, j in report.left_registering],
            "not_begun": report.not_begun,
        }
    )
    if dry_run:
        for a in report.added:
            if a.resumed:
                out.line(f"would resume job {a.job_id} ({'+'.join(a.steps)}): {a.path}")
            else:
                out.line(f"would queue ({'+'.join(a.steps)}): {a.path}")
    for path, reason in report.skipped:
        out.line(f"skipped {path}: {reason}")
    for problem in report.problems:
        out.warn(problem)
    if report.interrupted:
        _print_interrupted(out, report)
        return
    verb = "would queue" if dry_run else "queued"
    resumed = sum(1 for a in report.added if a.resumed)
    of_them = f" ({resumed} of them {'to be ' if dry_run else ''}resumed)" if resumed else ""
    out.line(
        f"{verb} {len(report.added)} job(s){of_them}; {len(report.skipped)} skipped, "
        f"{len(report.done)} already done, {len(report.problems)} problem(s)",
        fg="green" if not report.problems else "yellow",
    )


def _print_interrupted(out: Output, report: add_service.AddReport) -> None:
    for path, job_id in report.left_registering:
        out.line(f"left registering job {job_id}: {path}")
    out.warn(
        f"interrupted: {len(report.added)} job(s) queued, {len(report.left_registering)} left registering, "
        f"{report.not_begun} not begun; run crh_add again in the same tree: it resumes what was left "
        "(no job is queued twice)"
    )


def _run_local(out: Output, paths, options, found, local_jobs, crtomo, crmod, db_url) -> None:
    # Only --local runs a worker here: its modules are not loaded for a plain crh_add.
    from cr_queue import config, local

    settings, database = open_db(db_url, crtomo=crtomo, crmod=crmod)
    run = local.run_local(
        database,
        paths,
        options,
        local.configured_solvers(settings),
        limits=config.archive_limits(settings),
        jobs=local_jobs,
        threads=options.threads,
        found=found,
        on_job_end=lambda ended: out.line(f"[{ended.done}/{ended.total}] {ended.message}"),
    )
    _print(out, run.added, False)
    report = run.retrieved
    if not out.json:
        for item in report.failed:
            out.line(f"job {item.job_id} FAILED: {item.path}: {item.reason}", fg="red")
        out.line(f"local run: {len(report.retrieved)} retrieved, {len(report.failed)} failed")
    raise SystemExit(max(run.added.exit_code, report.exit_code))
