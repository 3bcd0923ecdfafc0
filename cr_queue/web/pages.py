"""What each page of `crh web` shows, as plain data for its template.

Every function takes an open connection of the caller's login: row-level
security has already decided which jobs exist for it.  The overview reuses
``crh status``'s report (status.snapshot: totals, running and failed jobs,
queue depth, sipdirs, workers, the time to drain) and adds what a picture
of the day needs (queries/web.sql); a job's page reuses ``crh show``'s
(admin.show: the fields and the whole event history) and adds what the job
computed (results.py).
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from cr_queue import admin, job_states, status
from cr_queue.job_states import JobStatus
from cr_queue.queries import session
from cr_queue.queries import web as wq
from cr_queue.web import formats
from cr_queue.web.results import Results

JOB_STATES = tuple(str(state) for state in JobStatus)
ENDED = tuple(str(state) for state in job_states.ENDED)
OVERVIEW_LIST = 10  # failures, running jobs and sipdirs listed on the overview (the rest counted)
LATEST_JOBS = 15
PAGE_SIZE = 50


class NotFound(Exception):
    """The thing asked for does not exist for this login; the message says what."""


# -------------------------------------------------------------- overview


def overview(conn: psycopg.Connection, side: psycopg.Connection) -> dict[str, Any]:
    """``crh status``'s report on ``conn`` and the web's own queries on ``side``, at the same
    time: they are independent, and the database runs them on two cores (at 100,000
    jobs this takes the overview from about the sum of both to about the longer one)."""
    extra: dict[str, Any] = {}
    failure: list[BaseException] = []

    def web_queries() -> None:
        try:
            with session.read_only_snapshot(side):
                extra.update(
                    facts=wq.session_facts(side),
                    by_group=wq.by_state_and_group(side),
                    hourly=wq.hourly(side),
                    per_node=wq.running_per_node(side),
                    held=wq.running_by_worker(side),
                    latest=wq.latest_jobs(side, LATEST_JOBS),
                )
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    helper = threading.Thread(target=web_queries, name="crh-web-overview")
    helper.start()
    try:
        report = status.snapshot(conn, limit=OVERVIEW_LIST)
    finally:
        helper.join()
    if failure:
        raise failure[0]
    for worker in report["workers"]["items"]:
        worker["job_ids"] = extra["held"].get(worker["id"], [])
    everyone = report["everyone"]
    return {
        **extra["facts"],
        "report": report,
        "by_group": _pivot(extra["by_group"]),
        "everyone_by_group": _pivot(everyone["by_group"]) if everyone else None,
        "chart": day_chart(extra["hourly"]),
        "per_node": extra["per_node"],
        "latest": status.jsonable(extra["latest"]),
    }


def _pivot(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(group, status, jobs) rows as one row per group with a column per state and a total."""
    groups: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        entry = groups.setdefault(row["group"], {"group": row["group"], "total": 0, **{s: 0 for s in JOB_STATES}})
        entry[row["status"]] = entry.get(row["status"], 0) + row["jobs"]
        entry["total"] += row["jobs"]
    return sorted(groups.values(), key=lambda g: (g["group"] is not None, g["group"] or ""))


@dataclass(frozen=True)
class Bar:
    x: float
    finished_y: float
    finished_h: float
    failed_y: float
    failed_h: float
    label: str
    title: str


def day_chart(hourly: list[dict[str, Any]], *, width: float = 720, height: float = 180, pad: float = 28) -> dict[str, Any]:
    """Geometry of the last day's chart (an inline SVG): bars of jobs finished and failed
    per hour, a line of the queue's depth, each on its own scale (the axis labels say which)."""
    n = max(len(hourly), 1)
    step = (width - 2 * pad) / n
    top_done = max([h["finished"] + h["failed"] for h in hourly] + [1])
    top_queue = max([h["queued"] for h in hourly] + [1])
    plot_h = height - 2 * pad
    bars, points = [], []
    for i, hour in enumerate(hourly):
        x = pad + i * step
        done_h = plot_h * hour["finished"] / top_done
        failed_h = plot_h * hour["failed"] / top_done
        base = height - pad
        moment = hour["hour"]
        label = moment.astimezone().strftime("%H") if isinstance(moment, datetime) else str(moment)
        bars.append(
            Bar(
                x=round(x + step * 0.1, 1),
                finished_y=round(base - done_h, 1),
                finished_h=round(done_h, 1),
                failed_y=round(base - done_h - failed_h, 1),
                failed_h=round(failed_h, 1),
                label=label,
                title=f"{label}:00 - {hour['finished']} finished, {hour['failed']} failed, {hour['queued']} queued at the end",
            )
        )
        points.append(f"{x + step / 2:.1f},{base - plot_h * hour['queued'] / top_queue:.1f}")
    return {
        "width": width,
        "height": height,
        "pad": pad,
        "bar_width": round(step * 0.8, 1),
        "bars": bars,
        "queue_line": " ".join(points),
        "top_done": top_done,
        "top_queue": top_queue,
        "finished": sum(h["finished"] for h in hourly),
        "failed": sum(h["failed"] for h in hourly),
    }


# ------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Filters:
    """The job list's filters, as a person typed them (empty means: any)."""

    status: str | None = None
    username: str | None = None
    group: str | None = None
    sipdir: str | None = None
    path: str | None = None

    @classmethod
    def of(cls, query: dict[str, str]) -> Filters:
        def value(key: str) -> str | None:
            text = (query.get(key) or "").strip()
            return text or None

        state = value("state")
        if state is not None and state not in JOB_STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(JOB_STATES)}")
        return cls(status=state, username=value("user"), group=value("group"), sipdir=value("sipdir"), path=value("path"))

    def query(self) -> dict[str, str]:
        """The filters as the list's URL query (for the next page's link)."""
        pairs = {"state": self.status, "user": self.username, "group": self.group, "sipdir": self.sipdir, "path": self.path}
        return {k: v for k, v in pairs.items() if v}


def jobs(conn: psycopg.Connection, filters: Filters, *, before: int | None = None, limit: int = PAGE_SIZE) -> dict[str, Any]:
    chosen = dataclasses.asdict(filters)
    rows, total = wq.jobs_page(conn, chosen, before=before, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "filters": filters,
        "states": JOB_STATES,
        "jobs": status.jsonable(rows),
        "total": total,
        "before": before,
        "next_before": rows[-1]["id"] if more and rows else None,
    }


# ------------------------------------------------------------------- job


def job(conn: psycopg.Connection, job_id: int, results: Results) -> dict[str, Any]:
    found = admin.show(conn, [job_id]).get(job_id)
    if found is None:
        raise NotFound(f"job {job_id} does not exist or is not one this login ({_login(conn)}) may see")
    page: dict[str, Any] = {
        "job": found, "ended": found["status"] in ENDED, "outputs": None, "grid_problem": None, "input_model": False,
    }
    failed_event = next((e for e in reversed(found["events"]) if e["event"] == "failed"), None)
    page["event_log_tail"] = (failed_event or {}).get("detail", {}).get("log_tail") or []
    if found["result_sha256"] and found["status"] in ("finished", "failed"):
        outputs = results.outputs(conn, found["result_sha256"])
        page["outputs"] = outputs
        if outputs.magnitude is not None and found["input_sha256"]:
            grid = results.grid(conn, found["input_sha256"])
            page["grid_problem"] = grid.problem
            if grid.mesh is not None and outputs.magnitude[1].size != grid.mesh.n_cells:
                page["grid_problem"] = (
                    f"{outputs.magnitude[0]} has {outputs.magnitude[1].size} values, "
                    f"grid/elem.dat {grid.mesh.n_cells} cells"
                )
    if found["status"] == "finished" and (found["sim_type"] == "mod" or found["model_first"]) and found["input_sha256"]:
        page["input_model"] = results.grid(conn, found["input_sha256"]).rho is not None
    if found["sipdir"]:
        page["frequency"] = formats.frequency_of(posixpath.basename(found["source_path"].rstrip("/")))
    return page


def job_archives(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    row = wq.job_archives(conn, job_id)
    if row is None:
        raise NotFound(f"job {job_id} does not exist or is not one this login ({_login(conn)}) may see")
    return row


def _login(conn: psycopg.Connection) -> str:
    return conn.info.user


# ---------------------------------------------------------------- sipdir


def sipdir(conn: psycopg.Connection, path: str, host: str, results: Results) -> dict[str, Any]:
    """A sipdir's frequencies side by side, lowest frequency first."""
    rows = wq.sipdir_jobs(conn, path, host)
    if not rows:
        raise NotFound(f"no jobs of the sipdir {path} on {host} that this login ({_login(conn)}) may see")
    frequencies = []
    for row in status.jsonable(rows):
        row["frequency"] = formats.frequency_of(posixpath.basename(row["source_path"].rstrip("/")))
        row["final_rms"] = None
        if row["status"] == "finished" and row["result_sha256"]:
            convergence = results.outputs(conn, row["result_sha256"]).convergence
            row["final_rms"] = convergence.final_rms if convergence else None
        frequencies.append(row)
    frequencies.sort(key=_by_frequency)
    counts = {state: sum(1 for r in frequencies if r["status"] == state) for state in JOB_STATES}
    return {"sipdir": path, "host": host, "frequencies": frequencies, "counts": counts,
            "side_by_side": any(r["status"] == "finished" and r["result_sha256"] for r in frequencies)}


def _by_frequency(row: dict[str, Any]) -> tuple:
    return (row["frequency"] is None, row["frequency"] if row["frequency"] is not None else math.inf, row["source_path"])


def sipdir_picture(conn: psycopg.Connection, path: str, host: str, results: Results) -> bytes | None:
    """The finished frequencies' models side by side on common colour scales."""
    rows = wq.sipdir_jobs(conn, path, host)
    if not rows:
        raise NotFound(f"no jobs of the sipdir {path} on {host} that this login ({_login(conn)}) may see")
    for row in rows:
        row["frequency"] = formats.frequency_of(posixpath.basename(row["source_path"].rstrip("/")))
    return results.frequencies(conn, sorted(rows, key=_by_frequency))
