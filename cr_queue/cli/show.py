"""crh show: one job's fields and its whole history from the events table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cr_queue import admin
from cr_queue.cli import fmt
from cr_queue.cli.common import Output, db_option, fail, open_db, reports, targets_argument


@click.command("show")
@targets_argument
@db_option
@reports
def show_command(targets, db_url, out):
    """Print a job's fields and its whole history: who (database role, OS
    user), where (host, pid, worker), what (the event's detail) and when.

    JOB is a job id, a tomodir or its .crh file (a directory: every job
    whose .crh lies below it).  Exit 1 when a job is not in the database.
    """
    from cr_queue import status
    from cr_queue.targets import select

    selection = select(list(targets))
    _settings, database = open_db(db_url)
    with database.connect("crh_show") as conn:
        # A retrieved tomodir has no .crh any more: its jobs are found by path.
        by_path = status.jobs_registered_at(conn, [Path(t) for t in selection.bare]) if selection.bare else {}
        for target in selection.bare:
            ids = by_path.get(Path(target))
            if ids:
                selection.problems = [p for p in selection.problems if not p.startswith(f"{target}: no .crh file")]
                selection.ids = sorted(set(selection.ids) | set(ids))
        if not selection.ids and selection.problems:
            fail("; ".join(selection.problems))
        found = admin.show(conn, selection.ids)
    problems = list(selection.problems)
    problems += [f"job {i}: not in the database {database.redacted}" for i in selection.ids if i not in found]
    out.emit({"jobs": [found[i] for i in selection.ids if i in found], "problems": problems})
    if not out.json and not out.quiet:
        for n, job_id in enumerate(i for i in selection.ids if i in found):
            if n:
                click.echo()
            for line in render_job(found[job_id], out):
                click.echo(line)
    for problem in problems:
        out.warn(problem)
    raise SystemExit(1 if problems else 0)


def _fg(status: str | None) -> str | None:
    return {"failed": "red", "finished": "green", "running": "cyan", "cancelled": "yellow"}.get(status or "")


def render_job(job: dict[str, Any], out: Output) -> list[str]:
    def style(text: str, fg: str | None = None, bold: bool = False) -> str:
        return click.style(text, fg=fg, bold=bold) if out.color and (fg or bold) else text

    steps = "modelling, then inversion" if job["sim_type"] == "inv" and job["model_first"] else {"mod": "modelling", "inv": "inversion"}[job["sim_type"]]
    retrieved = f", retrieved {fmt.when(job['datetime_downloaded'])}" if job["downloaded"] else ", not retrieved"
    lines = [style(f"job {job['id']}", bold=True) + ": " + style(job["status"], _fg(job["status"])) + retrieved + f" ({steps})"]

    def field(name: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {name:<12} {value}")

    field("tomodir", f"{job['source_path']}  ({job['username']}@{job['source_computer']}, role {job['db_role']})")
    field(".crh file", job["crh_file"])
    field("sipdir", job.get("sipdir"))
    field("group", job["job_group"])
    field(
        "settings",
        f"priority {job['priority']}, {fmt.plural(job['threads'], 'thread')}, "
        f"timeout {fmt.duration(job['timeout_s']) if job['timeout_s'] else 'none'}, "
        f"attempt {job['attempt']} ({job['tries']} of {job['max_attempts']} tries used)",
    )
    if job["worker_id"] is not None or job["inv_computer"]:
        worker = f"{job['worker_name']} (id {job['worker_id']})" if job["worker_id"] is not None else "-"
        field("worker", f"{worker} on {job['inv_computer'] or job['worker_host'] or '?'}")
    if job["input_sha256"]:
        field("input", f"{job['input_sha256']} ({fmt.size(job['input_size'])})")
    if job["result_sha256"]:
        field("result", f"{job['result_sha256']} ({fmt.size(job['result_size'])})")
    if job.get("datetime_purged"):
        # crh_cleanup let the archives go after retrieval; the hashes are in the 'purged' event below.
        field("archives", f"input and result archives purged {fmt.when(job['datetime_purged'])} (retrieved before)")
    field("exit code", job["exit_code"])
    if job["failure_category"] or job["failure_reason"]:
        field("failure", style(f"{job['failure_category']}: {job['failure_reason']}", "red"))
    for label, key in (
        ("added", "datetime_init"),
        ("queued", "datetime_queued"),
        ("started", "datetime_started"),
        ("finished", "datetime_finished"),
        ("retrieved", "datetime_downloaded"),
        ("purged", "datetime_purged"),
    ):
        if job.get(key):
            field(label, fmt.when(job[key]))
    lines.append(style(f"  history ({fmt.plural(len(job['events']), 'event')}):", bold=True))
    for e in job["events"]:
        who = f"{e['os_user'] or '?'} (role {e['db_role']})"
        where = f"on {e['host'] or '?'}" + (f" pid {e['pid']}" if e["pid"] else "")
        if e["worker_id"] is not None:
            where += f", worker {e['worker_name'] or '?'} (id {e['worker_id']})"
        attempt = f"attempt {e['attempt']}" if e["attempt"] else ""
        lines.append(f"    {fmt.when(e['datetime'])}  {style(e['event'].ljust(12), _fg(e['status']))} {attempt:<10} by {who} {where}")
        lines += _detail(e["detail"])
    return lines


def _detail(detail: Any, indent: str = "        ") -> list[str]:
    """An event's detail: short values as key=value, long or multi-line ones as indented blocks."""
    if not detail:
        return []
    if not isinstance(detail, dict):
        return [indent + json.dumps(detail)]
    inline, blocks = [], []
    for key, value in detail.items():
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            blocks.append(f"{indent}{key}:")  # e.g. the last lines of the solver's log
            blocks += [f"{indent}  {line}" for line in value]
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) and "path" in v for v in value.values()):
            blocks.append(f"{indent}{key}:")  # solver provenance: path, version or hash, size
            for name, info in sorted(value.items()):
                ident = info.get("version") or (f"sha256 {info['sha256'][:16]}" if info.get("sha256") else "")
                extra = ", ".join(x for x in (ident, fmt.size(info["size"]) if "size" in info else "") if x)
                blocks.append(f"{indent}  {name}: {info['path']}" + (f" ({extra})" if extra else ""))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if "\n" in text or len(text) > 80:
            blocks.append(f"{indent}{key}:")
            blocks += [f"{indent}  {line}" for line in text.rstrip("\n").splitlines()]
        else:
            inline.append(f"{key}={text}")
    return ([indent + "  ".join(inline)] if inline else []) + blocks
