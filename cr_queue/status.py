"""What the queue is doing: the service behind ``crh_status``.

:func:`snapshot` answers from a handful of aggregate queries run in one
read-only snapshot, so the numbers agree with each other and the answer
stays fast at hundreds of thousands of jobs: nothing is counted in Python,
and the listed running and failed jobs are bounded (with the count of the
rest).  The result is plain JSON-able data; its shape is documented in
docs/admin.md and is what ``crh status --json`` prints.

:func:`tree` is the view from a directory: the state of each ``.crh`` file
below it, looked up in one query.
"""

from __future__ import annotations

import getpass
import math
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psycopg

from cr_queue.job_states import JobStatus
from cr_queue.queries import admin as aq
from cr_queue.queries import jobs as jq
from cr_queue.queries import session
from cr_queue.tomodir import control

FORMAT_VERSION = 1
DEFAULT_LIMIT = 50
RUNTIME_SAMPLE = 200


@dataclass(frozen=True)
class Scope:
    """Whose jobs a report covers: everybody's, or one user's from one computer (``--mine``)."""

    username: str | None = None
    host: str | None = None

    @classmethod
    def mine(cls) -> Scope:
        return cls(getpass.getuser(), socket.gethostname())

    @property
    def filter(self) -> tuple[str, str] | None:
        return (self.username, self.host) if self.username and self.host else None

    def as_dict(self) -> dict[str, Any]:
        return {"mine": self.filter is not None, "username": self.username, "host": self.host}


def jsonable(value: Any) -> Any:
    """Datetimes as ISO 8601 strings; containers recursively; everything else unchanged."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def snapshot(
    conn: psycopg.Connection,
    *,
    scope: Scope = Scope(),
    limit: int = DEFAULT_LIMIT,
    runtime_sample: int = RUNTIME_SAMPLE,
) -> dict[str, Any]:
    """Everything ``crh status`` shows, as one JSON-able dict (see docs/admin.md)."""
    mine = scope.filter
    with session.read_only_snapshot(conn):
        generated_at = aq.now(conn)
        totals_rows = aq.totals(conn, mine)
        running = aq.running_jobs(conn, mine, limit)
        failed = aq.failed_jobs(conn, mine, limit)
        categories = aq.failure_categories(conn, mine)
        depth = aq.queue_depth(conn, mine)
        sipdir_rows = aq.sipdirs(conn, mine, limit)
        worker_rows = aq.workers(conn)
        worker_counts = aq.worker_counts(conn)
        runtime = aq.recent_runtime(conn, runtime_sample)
        # Row security shows a scientist only their own jobs; the whole queue only as numbers.
        everyone_rows = None if aq.privileged(conn) else aq.queue_counts(conn)

    totals = {str(state): 0 for state in JobStatus}
    for row in totals_rows:
        totals[row["status"]] = row["jobs"]
    failed_not_retrieved = sum(c["jobs"] for c in categories)

    sipdir_total = sipdir_rows[0]["listed_of"] if sipdir_rows else 0
    for row in sipdir_rows:
        row.pop("listed_of")
        row["done"] = row["finished"]

    everyone = None
    if everyone_rows is not None:
        everyone = {"totals": {str(state): 0 for state in JobStatus}, "by_group": everyone_rows}
        for row in everyone_rows:
            everyone["totals"][row["status"]] = everyone["totals"].get(row["status"], 0) + row["jobs"]
        everyone["totals"]["total"] = sum(row["jobs"] for row in everyone_rows)
    whole = everyone["totals"] if everyone else totals

    live = [w for w in worker_rows if w["state"] in ("running", "draining")]
    estimate = _estimate(
        queued=whole["queued"],
        running=whole["running"],
        median_s=runtime["median_s"],
        sample=runtime["sample"],
        slots=sum(w["jobs"] for w in live if w["state"] == "running" and w["requested"] is None),
    )
    report = {
        "format": FORMAT_VERSION,
        "generated_at": generated_at,
        "scope": scope.as_dict(),
        "totals": {**totals, "total": sum(totals.values())},
        "running": {"count": totals["running"], "listed": len(running), "jobs": running},
        "failed": {
            "count": failed_not_retrieved,
            "listed": len(failed),
            "by_category": {c["category"]: c["jobs"] for c in categories},
            "jobs": failed,
        },
        "queue_depth": depth,
        "sipdirs": {"count": sipdir_total, "listed": len(sipdir_rows), "items": sipdir_rows},
        "workers": {
            "live": len(live),
            "lost": sum(1 for w in worker_rows if w["state"] == "lost"),
            "stopped": worker_counts["stopped"],
            "items": worker_rows,
        },
        "estimate": estimate,
        "everyone": everyone,
    }
    return jsonable(report)


def _estimate(*, queued: int, running: int, median_s: float | None, sample: int, slots: int) -> dict[str, Any]:
    """Time to drain: the remaining jobs run in waves of ``slots``, each a median runtime long.

    Rough by design (it ignores threads, groups and solver types); it says why
    when it cannot say anything.
    """
    remaining = queued + running
    result: dict[str, Any] = {
        "remaining_jobs": remaining,
        "median_runtime_s": median_s,
        "runtime_sample": sample,
        "slots": slots,
        "drain_s": None,
        "reason": None,
    }
    if remaining == 0:
        result["drain_s"] = 0.0
    elif median_s is None:
        result["reason"] = "no job finished in the last 7 days to learn runtimes from"
    elif slots == 0:
        result["reason"] = "no live worker is taking jobs"
    else:
        result["drain_s"] = math.ceil(remaining / slots) * float(median_s)
    return result


# ---------------------------------------------------------------------- tree


def tree(conn: psycopg.Connection, paths: Iterable[Path | str]) -> dict[str, Any]:
    """The state of every ``.crh`` below ``paths``, looked up in one query."""
    paths = [Path(p) for p in paths] or [Path(".")]
    found = control.gather(paths)
    problems = list(found.problems)
    entries: list[dict[str, Any]] = []
    for crh, cf in found.files:
        crh = Path(os.path.abspath(crh))
        if cf is None:
            entries.append({"crh_file": str(crh), "tomodir": None, "job_id": None, "status": "unreadable"})
        else:
            entries.append({"crh_file": str(crh), "tomodir": str(crh)[: -len(control.SUFFIX)], "job_id": cf.job_id})
    ids = [e["job_id"] for e in entries if e["job_id"] is not None]
    states = aq.job_states(conn, ids) if ids else {}
    counts: dict[str, int] = {}
    for entry in entries:
        if entry["job_id"] is not None:
            row = states.get(entry["job_id"])
            if row is None:
                entry["status"] = "unknown"
                problems.append(f"{entry['crh_file']}: job {entry['job_id']} is not in this database")
            else:
                entry.update(
                    status=row["status"],
                    retrieved=row["downloaded"],
                    sim_type=row["sim_type"],
                    attempt=row["attempt"],
                    host=row["inv_computer"],
                    failure_category=row["failure_category"],
                    failure_reason=row["failure_reason"],
                    sipdir=row["sipdir"],
                    finished=row["finished"],
                )
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return jsonable(
        {
            "format": FORMAT_VERSION,
            "roots": [str(p) for p in paths],
            "entries": entries,
            "counts": counts,
            "problems": problems,
        }
    )


# ----------------------------------------------------------------- by path


def jobs_registered_at(conn: psycopg.Connection, paths: Iterable[Path]) -> dict[Path, list[int]]:
    """The jobs this host registered from each directory (or below it), found by path: a
    retrieved tomodir has no .crh any more, but its jobs keep their source path."""
    host = socket.gethostname()
    return {Path(p): jq.jobs_at(conn, host, [os.path.abspath(p)]) for p in paths}
