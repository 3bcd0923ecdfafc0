"""crh_status: what the queue is doing, once, on a refreshing screen, or for scripts."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import psycopg

from cr_queue.db import connection as db
from cr_queue import status as status_service
from cr_queue.cli import fmt
from cr_queue.cli.common import Output, db_option, open_db, reports

_STATE_COLOURS = {"failed": "red", "running": "cyan", "finished": "green", "lost": "yellow", "unknown": "yellow", "unreadable": "red"}


@click.command("status")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--tree", is_flag=True, help="Show the state of each .crh file below PATHS (default: the current directory).")
@click.option("--mine", is_flag=True, help="Only the jobs of the current user added from this computer.")
@click.option(
    "--watch",
    "watch_s",
    type=click.FloatRange(min=0.5),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (default 2) until Ctrl-C: in place on a terminal, else one block (or JSON line) each time.",
)
@click.option("--limit", type=click.IntRange(min=0), default=status_service.DEFAULT_LIMIT, show_default=True, help="Running jobs, failed jobs and sipdirs listed at most (the rest are counted).")
@db_option
@reports
def status_command(paths, tree, mine, watch_s, limit, db_url, out):
    """Show the queue: jobs by state, running and failed jobs, queue depth per
    user and group, sipdirs, workers, and an estimate of the time to drain.

    With --tree (or PATHS), show instead the state of each .crh file below
    the given directories.  --json prints the documented report of
    docs/admin.md.  Exit codes: 0, or 1 in tree mode when a .crh file is
    unreadable or names a job the database does not know.
    """
    tree_mode = tree or bool(paths)
    scope = status_service.Scope.mine() if mine else status_service.Scope()
    if tree_mode and mine:
        raise click.UsageError("--mine applies to the queue view; --tree already shows only the .crh files below PATHS")
    _settings, database = open_db(db_url)
    conn: psycopg.Connection | None = None
    code = 0
    first = True
    report: dict[str, Any] = {}
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = database.connect("crh_status")
                if tree_mode:
                    report = status_service.tree(conn, paths)
                    code = 1 if report["problems"] else 0
                    text = "\n".join(_render_tree(report, out))
                else:
                    report = status_service.snapshot(conn, scope=scope, limit=limit)
                    text = "\n".join(_render(report, database.redacted, out))
            except (psycopg.OperationalError, db.DatabaseError) as exc:
                if watch_s is None:
                    raise db.DatabaseError(
                        db.unreachable_message(database.url, database.source, exc)
                        if isinstance(exc, psycopg.OperationalError)
                        else str(exc)
                    ) from None
                conn = None
                report = {"error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}
                text = f"database unreachable ({report['error']}); trying again in {watch_s:g} s"
            _show(out, report, text, watch=watch_s is not None, first=first)
            first = False
            if watch_s is None:
                break
            time.sleep(watch_s)
    except KeyboardInterrupt:
        if not out.json:
            click.echo()
    finally:
        if conn is not None and not conn.closed:
            conn.close()
    if tree_mode and not out.json and not out.quiet:
        for problem in report.get("problems", []):
            out.warn(problem)
    raise SystemExit(code)


def _show(out: Output, report: dict[str, Any], text: str, *, watch: bool, first: bool) -> None:
    if out.quiet:
        return
    if out.json:
        if watch:
            click.echo(json.dumps(report, separators=(",", ":"), default=str))  # one JSON document per line
        else:
            click.echo(json.dumps(report, indent=2, default=str))
        sys.stdout.flush()
        return
    if watch and sys.stdout.isatty():
        click.echo("\033[H\033[2J" + text + "\n\n(Ctrl-C to stop)", nl=True)
    else:
        if watch and not first:
            click.echo()
        click.echo(text)
    sys.stdout.flush()


def _style(out: Output, text: str, fg: str | None = None, bold: bool = False) -> str:
    return click.style(text, fg=fg, bold=bold) if out.color and (fg or bold) else text


def _more(count: int, listed: int) -> list[str]:
    return [f"  ... and {count - listed:,} more (--limit N lists more)"] if count > listed else []


def _render(report: dict[str, Any], where: str, out: Output) -> list[str]:
    t = report["totals"]
    scope = report["scope"]
    lines = [
        _style(out, f"cr_queue status at {fmt.when(report['generated_at'])}", bold=True)
        + f"  ({where}{', only jobs of ' + scope['username'] + ' on ' + scope['host'] if scope['mine'] else ''})"
    ]
    parts = [
        f"{t['queued']:,} queued",
        _style(out, f"{t['running']:,} running", "cyan" if t["running"] else None),
        f"{t['finished']:,} finished",
        _style(out, f"{t['failed']:,} failed", "red" if t["failed"] else None),
        f"{t['cancelled']:,} cancelled",
    ]
    if t["registering"]:
        parts.append(f"{t['registering']:,} registering")
    lines.append(f"jobs: {', '.join(parts)}; {t['total']:,} in all")
    if report["everyone"]:
        e = report["everyone"]["totals"]
        lines.append(
            f"whole queue (every user; you see only your own jobs): {e['queued']:,} queued, {e['running']:,} running, "
            f"{e['finished']:,} finished, {e['failed']:,} failed; {e['total']:,} in all"
        )
    lines.append("estimate: " + _estimate_text(report["estimate"]))

    running = report["running"]
    if running["count"]:
        lines += ["", _style(out, f"running ({running['count']:,}):", bold=True)]
        lines += fmt.table(
            ["JOB", "USER", "WORKER", "HOST", "ATTEMPT", "TRIES", "ELAPSED", "TOMODIR"],
            [
                [j["id"], j["username"], j["worker"], j["host"], j["attempt"], f"{j['tries']}/{j['max_attempts']}",
                 fmt.duration(j["elapsed_s"]), j["source_path"]]
                for j in running["jobs"]
            ],
        )
        lines += _more(running["count"], running["listed"])

    failed = report["failed"]
    if failed["count"]:
        by = ", ".join(f"{cat} {n:,}" for cat, n in failed["by_category"].items())
        lines += ["", _style(out, f"failed, not yet retrieved ({failed['count']:,}: {by}):", "red", bold=True)]
        lines += fmt.table(
            ["JOB", "USER", "HOST", "FINISHED", "REASON", "TOMODIR"],
            [
                [j["id"], j["username"], j["host"], fmt.when(j["finished"]), _short(j["failure_reason"], 60), j["source_path"]]
                for j in failed["jobs"]
            ],
        )
        lines += _more(failed["count"], failed["listed"])

    if report["queue_depth"]:
        lines += ["", _style(out, "queue by user and group:", bold=True)]
        lines += fmt.table(
            ["USER", "GROUP", "QUEUED", "RUNNING", "TOP PRIORITY", "OLDEST QUEUED"],
            [
                [d["username"], d["group"] or "-", f"{d['queued']:,}", f"{d['running']:,}", d["top_priority"],
                 fmt.when(d["oldest_queued"])]
                for d in report["queue_depth"]
            ],
        )

    sip = report["sipdirs"]
    if sip["count"]:
        lines += ["", _style(out, f"sipdirs ({sip['count']:,}):", bold=True)]
        for s in sip["items"]:
            extra = [f"{s[k]} {k}" for k in ("failed", "running", "queued", "cancelled") if s[k]]
            if s["retrieved"]:
                extra.append(f"{s['retrieved']} retrieved")
            lines.append(
                f"  {s['sipdir']} ({s['username']}@{s['source_computer']}): "
                f"{s['done']} of {s['total']} frequencies done" + (f", {', '.join(extra)}" if extra else "")
            )
        lines += _more(sip["count"], sip["listed"])

    w = report["workers"]
    head = f"workers ({w['live']} live" + (f", {w['lost']} lost" if w["lost"] else "") + f", {w['stopped']:,} stopped in all):"
    lines += ["", _style(out, head, bold=True)]
    if w["items"]:
        lines += worker_table(w["items"], out)
    else:
        lines.append("  none: start one with crh_worker")
    return lines


def worker_table(workers: list[dict[str, Any]], out: Output) -> list[str]:
    rows = []
    for w in workers:
        state = w["state"] + (f" ({w['requested']} requested)" if w["requested"] and w["state"] != "stopped" else "")
        if w["state"] == "stopped":
            beat = f"stopped {fmt.when(w['stopped'])}" + (f": {w['stop_reason']}" if w["stop_reason"] else "")
        else:
            beat = f"{fmt.duration(w['heartbeat_age_s'])} ago"
        budget = f"{w['jobs']}x{w['threads']}" + (f", {w['cpus']} cpus" if w.get("cpus") else "")
        rows.append([w["id"], w["name"], w["host"], w["pid"], state, beat, budget, w["held"], solvers_text(w["solvers"])])
    lines = fmt.table(["ID", "NAME", "HOST", "PID", "STATE", "HEARTBEAT", "JOBSxTHREADS", "HELD", "SOLVERS"], rows)
    if out.color:
        lines = [lines[0]] + [
            _style(out, line, "yellow") if w["state"] == "lost" else line for line, w in zip(lines[1:], workers)
        ]
    return lines


def solvers_text(solvers: dict[str, Any] | None) -> str:
    parts = []
    for name, info in sorted((solvers or {}).items()):
        if not isinstance(info, dict):
            parts.append(f"{name}={info}")
            continue
        ident = info.get("version") or (info.get("sha256") or "")[:12]
        parts.append(f"{name}={info.get('path', '?')}" + (f" ({ident})" if ident else ""))
    return ", ".join(parts) or "-"


def _estimate_text(e: dict[str, Any]) -> str:
    if e["remaining_jobs"] == 0:
        return "nothing queued or running"
    if e["drain_s"] is None:
        return f"{e['remaining_jobs']:,} jobs to go; cannot estimate: {e['reason']}"
    return (
        f"about {fmt.duration(e['drain_s'])} to drain {e['remaining_jobs']:,} queued and running jobs "
        f"(median runtime {fmt.duration(e['median_runtime_s'])} of the last {e['runtime_sample']} finished, "
        f"{e['slots']} worker slots)"
    )


def _short(text: str | None, width: int) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _render_tree(report: dict[str, Any], out: Output) -> list[str]:
    cwd = os.getcwd()
    rows = []
    for e in report["entries"]:
        status = e["status"] + (", retrieved" if e.get("retrieved") else "")
        note = ""
        if e["status"] == "failed":
            note = _short(e.get("failure_reason"), 60)
        elif e["status"] == "running" and e.get("host"):
            note = f"on {e['host']}, attempt {e.get('attempt')}"
        path = os.path.relpath(e["crh_file"], cwd) if os.path.isabs(e["crh_file"]) else e["crh_file"]
        rows.append([_style(out, status, _STATE_COLOURS.get(e["status"])), e["job_id"], path, note])
    if not rows:
        return [f"no .crh files below {', '.join(report['roots'])}"]
    lines = fmt.table(["STATE", "JOB", "CRH FILE", "NOTE"], rows, indent="")
    counts = ", ".join(f"{n:,} {state}" for state, n in sorted(report["counts"].items()))
    return lines + [f"{fmt.plural(len(rows), '.crh file')}: {counts}"]


def main() -> None:
    """The `crh_status` console script; lives here, not in cli/main.py, so it imports only what it needs."""
    status_command.main(prog_name="crh_status", help_option_names=["-h", "--help"])
