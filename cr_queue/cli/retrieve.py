"""crh_retrieve and crh_wait_retrieve: bring results back into the tree."""

from __future__ import annotations

from pathlib import Path

import click

from cr_queue import config
from cr_queue import retrieve as retrieve_service
from cr_queue.cli.common import Output, db_option, open_db, reports


def _item(item: retrieve_service.Item) -> dict:
    return {
        "path": str(item.path),
        "job_id": item.job_id,
        "status": item.status,
        "reason": item.reason,
        "files": item.files,
        "conflicts": item.conflicts,
    }


def _progress(out: Output):
    def show(item: retrieve_service.Item) -> None:
        if item.status == "finished":
            out.line(f"retrieved job {item.job_id} ({item.files} files): {item.path}", fg="green")
        elif item.status == "failed":
            out.line(f"job {item.job_id} FAILED: {item.path}: {item.reason}", fg="red")
        elif item.status == "cancelled":
            out.line(f"job {item.job_id} was cancelled: {item.path}")
        for rel in item.conflicts:
            out.warn(
                f"{item.path / rel} was changed after crh_add and was kept; "
                f"the result is beside it as {rel}{retrieve_service.CONFLICT_SUFFIX}"
            )

    return show


def _report(out: Output, report: retrieve_service.RetrieveReport, paths) -> None:
    nothing = not (report.retrieved or report.failed or report.pending or report.cancelled or report.elsewhere)
    if nothing and not report.problems:
        out.warn(
            f"no .crh file below {', '.join(map(str, paths))}: nothing there was added with crh_add, or all of it "
            "is retrieved already; run crh_retrieve where you ran crh_add (crh show TOMODIR tells a tomodir's jobs)"
        )
    out.emit(
        {
            "retrieved": [_item(i) for i in report.retrieved],
            "failed": [_item(i) for i in report.failed],
            "pending": [_item(i) for i in report.pending],
            "cancelled": [_item(i) for i in report.cancelled],
            "elsewhere": [{**_item(i), "message": text} for i, text in report.elsewhere],
            "problems": report.problems,
        }
    )
    for item in report.pending:
        out.line(f"job {item.job_id} is still {item.status}: {item.path}")
    for _item_elsewhere, text in report.elsewhere:
        out.line(text)
    for problem in report.problems:
        out.warn(problem)
    elsewhere = f", {len(report.elsewhere)} left to another crh_retrieve" if report.elsewhere else ""
    out.line(
        f"{len(report.retrieved)} retrieved, {len(report.failed)} failed, {len(report.cancelled)} cancelled, "
        f"{len(report.pending)} still pending{elsewhere}, {len(report.problems)} problem(s)",
        fg="green" if report.exit_code == 0 else "yellow",
    )


def _run(paths, wait: bool, poll_s: float, db_url, out) -> None:
    paths = list(paths) or [Path(".")]
    settings, database = open_db(db_url)
    limits = config.archive_limits(settings)
    if out.interactive:
        report = _with_bar(out, database, paths, wait, poll_s, limits)
    elif wait:
        def round_done(total: retrieve_service.RetrieveReport) -> None:
            if total.pending:
                done = len(total.retrieved) + len(total.failed)
                out.line(f"waiting: {done} done, {len(total.pending)} pending")

        report = retrieve_service.wait_retrieve(
            database, paths, limits=limits, poll_s=poll_s, progress=_progress(out), on_round=round_done
        )
    else:
        report = retrieve_service.retrieve(database, paths, limits=limits, progress=_progress(out))
    _report(out, report, paths)
    raise SystemExit(report.exit_code)


def _with_bar(
    out: Output, database, paths, wait: bool, poll_s: float, limits
) -> retrieve_service.RetrieveReport:
    """On a terminal: one progress bar; the per-job lines are printed once it is done."""
    total = retrieve_service.count(paths)
    done: list[retrieve_service.Item] = []
    with click.progressbar(
        length=max(total, 1), label="waiting" if wait else "retrieving", file=click.get_text_stream("stderr")
    ) as bar:
        def step(item: retrieve_service.Item) -> None:
            done.append(item)
            bar.update(1)

        if wait:
            report = retrieve_service.wait_retrieve(database, paths, limits=limits, poll_s=poll_s, progress=step)
        else:
            report = retrieve_service.retrieve(database, paths, limits=limits, progress=step)
    show = _progress(out)
    for item in done:
        if item.status != "finished" or item.conflicts:
            show(item)
    return report


_path_arg = click.argument("paths", nargs=-1, type=click.Path(path_type=Path))


@click.command("retrieve")
@_path_arg
@click.option("--wait", is_flag=True, help="Keep retrieving as jobs finish until none is pending.")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between checks with --wait.")
@db_option
@reports
def retrieve_command(paths, wait, poll_s, db_url, out):
    """Bring the results of finished jobs below PATHS (default: .) into their tomodirs."""
    _run(paths, wait, poll_s, db_url, out)


@click.command("wait-retrieve")
@_path_arg
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between checks.")
@db_option
@reports
def wait_retrieve_command(paths, poll_s, db_url, out):
    """Retrieve results below PATHS as jobs finish, until none is pending."""
    _run(paths, True, poll_s, db_url, out)
