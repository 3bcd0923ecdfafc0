"""Admin services: remote control of workers, per-host node settings, a job's whole history.

Workers are asked through the database: ``workers.requested`` is set to
'drain' (claim nothing more, finish the running jobs, exit) or 'stop' (give
the running jobs back to the queue and exit now); the worker reads it with
its heartbeat, and a NOTIFY on ``crh_worker_control`` (queries/admin.sql) lets it hear
at once.  Node settings are kept per host (cr_hydra's node_settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cr_queue.queries import admin as aq
from cr_queue.status import jsonable

REQUESTS = ("drain", "stop")


# -------------------------------------------------------------------- workers


@dataclass
class RequestResult:
    request: str
    changed: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)  # already asked, with why
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return jsonable(
            {"request": self.request, "changed": self.changed, "unchanged": self.unchanged, "problems": self.problems}
        )


def list_workers(conn: psycopg.Connection, *, include_stopped: bool = False) -> list[dict[str, Any]]:
    return jsonable(aq.workers(conn, include_stopped=include_stopped, limit=100_000))


def request(
    conn: psycopg.Connection, request: str, targets: Sequence[str] = (), hosts: Sequence[str] = ()
) -> RequestResult:
    """Ask the workers named by id or name (or every worker on ``hosts``) to drain or stop.

    A name may match several workers over time; only those not yet stopped are asked.
    """
    if request not in REQUESTS:
        raise ValueError(f"unknown request {request!r}; use one of {', '.join(REQUESTS)}")
    result = RequestResult(request)
    ids = [int(t) for t in targets if t.isdigit()]
    # A numeric name is still a name: "crh worker stop 7" finds worker id 7 or a worker named "7".
    found = aq.find_workers(conn, ids=ids, names=list(targets), hosts=hosts)
    matched: dict[int, dict[str, Any]] = {w["id"]: w for w in found}
    for target in targets:
        hits = [w for w in found if w["name"] == target or (target.isdigit() and w["id"] == int(target))]
        if not hits:
            result.problems.append(
                f"no worker with id or name {target!r}; `crh worker list --all` shows the known workers"
            )
        elif all(w["state"] == "stopped" for w in hits):
            result.problems.append(f"worker {target!r} has already stopped; nothing to {request}")
    for host in hosts:
        if not any(w["host"] == host and w["state"] != "stopped" for w in found):
            result.problems.append(f"no running worker on host {host!r}")
    live = [w for w in matched.values() if w["state"] != "stopped"]
    changed = {row["id"]: row for row in aq.request_workers(conn, [w["id"] for w in live], request)}
    for w in live:
        info = {k: w[k] for k in ("id", "name", "host", "pid")}
        if w["id"] in changed:
            info["heartbeat_age_s"] = w["heartbeat_age_s"]
            result.changed.append(info)
        elif w["requested"] is not None:
            info["requested"] = w["requested"]
            info["why"] = f"already asked to {w['requested']}"
            result.unchanged.append(info)
        else:
            # Row security let the statement through but not onto this row (a worker role
            # may change only its own workers).
            result.problems.append(
                f"worker {w['name']} (id {w['id']}): the database role {conn.info.user} may not change it; "
                "connect as a member of crh_admin"
            )
    return result


# ---------------------------------------------------------------------- nodes


def node_set(conn: psycopg.Connection, host: str, **values: Any) -> dict[str, Any]:
    return jsonable(aq.node_set(conn, host, **values))


def node_unset(
    conn: psycopg.Connection, host: str, *, nice: bool = False, cpus: bool = False, threads: bool = False
) -> dict[str, Any] | None:
    """Without field flags: forget the host's settings; with them: clear just those values.

    Returns what is left (None when the row is gone or never existed, see ``node_exists``).
    """
    if nice or cpus or threads:
        row = aq.node_clear(conn, host, nice=nice, cpus=cpus, threads=threads)
        if row is None:
            raise LookupError(host)
        return jsonable(row)
    if not aq.node_delete(conn, host):
        raise LookupError(host)
    return None


def node_list(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return jsonable(aq.node_list(conn))


# ----------------------------------------------------------------------- show


def show(conn: psycopg.Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Each job's fields and its whole event history, oldest first (two queries for all jobs)."""
    jobs = {row["id"]: {**row, "events": []} for row in aq.show_jobs(conn, ids)}
    for event in aq.show_events(conn, list(jobs)):
        jobs[event.pop("job_id")]["events"].append(event)
    return {job_id: jsonable(job) for job_id, job in jobs.items()}
