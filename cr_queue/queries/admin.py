"""The admin commands' statements: thin wrappers around ``admin.sql`` (status, show, worker
and node control, the cleanup plan).

Each answer is aggregated in SQL and listings are bounded (see the file's
header).  ``mine`` narrows the status statements to one user's jobs from one
computer: ``(username, host)``, or None for everyone's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from cr_queue.queries import jobs, loader, roles
from cr_queue.queries import workers as workers_q

SQL = loader.load("admin")

# A worker not stopped whose heartbeat is older than this is shown as lost (sooner when
# its liveness lock is gone too: a killed worker's connection drops it at once).
HEARTBEAT_STALE_S = 60


def _rows(conn: psycopg.Connection, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def _mine(mine: tuple[str, str] | None, **extra: Any) -> dict[str, Any]:
    """The parameters of a status statement: ``username`` and ``host`` NULL for everyone's jobs."""
    username, host = mine or (None, None)
    return {"username": username, "host": host, **extra}


# -------------------------------------------------------------------- status


def is_admin(conn: psycopg.Connection) -> bool:
    """May change every row: a member of crh_admin, or the owner of the tables (the embedded database)."""
    return roles.access(conn) == "admin"


def privileged(conn: psycopg.Connection) -> bool:
    """Whether the caller sees every job or, under row security, only its own (migration 0003)."""
    return bool(conn.execute(SQL.privileged).fetchone()[0])


def queue_counts(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every job in the queue as anonymous counts by status and group (no names, paths, hashes).

    Calls the SECURITY DEFINER function ``crh_queue_counts()``, which any
    cr_queue role may call: the way a user's status shows others' jobs.
    """
    return _rows(conn, SQL.queue_counts)


def now(conn: psycopg.Connection) -> datetime:
    return conn.execute(SQL.now).fetchone()[0]


def totals(conn: psycopg.Connection, mine: tuple[str, str] | None) -> list[dict[str, Any]]:
    return _rows(conn, SQL.totals, _mine(mine))


def running_jobs(conn: psycopg.Connection, mine: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    return _rows(conn, SQL.running_jobs, _mine(mine, limit=limit))


def failed_jobs(conn: psycopg.Connection, mine: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    return _rows(conn, SQL.failed_jobs, _mine(mine, limit=limit))


def failure_categories(conn: psycopg.Connection, mine: tuple[str, str] | None) -> list[dict[str, Any]]:
    return _rows(conn, SQL.failure_categories, _mine(mine))


def queue_depth(conn: psycopg.Connection, mine: tuple[str, str] | None) -> list[dict[str, Any]]:
    return _rows(conn, SQL.queue_depth, _mine(mine))


def sipdirs(conn: psycopg.Connection, mine: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    return _rows(conn, SQL.sipdirs, _mine(mine, limit=limit))


def workers(conn: psycopg.Connection, *, include_stopped: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
    params = {
        "include_stopped": include_stopped,
        "stale_s": HEARTBEAT_STALE_S,
        "grace_s": jobs.RESCUE_GRACE_S,
        "lock_namespace": workers_q.LOCK_NAMESPACE,
        "limit": limit,
    }
    return _rows(conn, SQL.workers, params)


def worker_counts(conn: psycopg.Connection) -> dict[str, int]:
    return _rows(conn, SQL.worker_counts)[0]


def recent_runtime(conn: psycopg.Connection, sample: int) -> dict[str, Any]:
    return _rows(conn, SQL.recent_runtime, {"sample": sample})[0]


def job_states(conn: psycopg.Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The state of many jobs by id in one query (the tree mode of status)."""
    return {row["id"]: row for row in _rows(conn, SQL.job_states, {"ids": list(ids)})}


# ---------------------------------------------------------------------- show


def show_jobs(conn: psycopg.Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(conn, SQL.show_jobs, {"ids": list(ids)})


def show_events(conn: psycopg.Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(conn, SQL.show_events, {"ids": list(ids)})


# -------------------------------------------------------- worker remote control


def find_workers(
    conn: psycopg.Connection, *, ids: Sequence[int] = (), names: Sequence[str] = (), hosts: Sequence[str] = ()
) -> list[dict[str, Any]]:
    params = {"ids": list(ids), "names": list(names), "hosts": list(hosts)}
    return _rows(conn, SQL.find_workers, params)


def request_workers(conn: psycopg.Connection, ids: Sequence[int], request: str) -> list[dict[str, Any]]:
    """Ask workers to drain or stop; they read it with their next heartbeat (or at once by NOTIFY)."""
    if request not in ("drain", "stop"):
        raise ValueError(f"unknown request {request!r}")
    rows = _rows(conn, SQL.request_workers, {"ids": list(ids), "request": request})
    for row in rows:
        row.pop("pg_notify", None)
    return rows


# -------------------------------------------------------------- node settings


def node_set(
    conn: psycopg.Connection,
    host: str,
    *,
    nice: int | None = None,
    cpus: int | None = None,
    threads: int | None = None,
    active: bool | None = None,
) -> dict[str, Any]:
    """Create or change a host's settings; only the values given change."""
    params = {
        "host": host,
        "nice": nice,
        "cpus": cpus,
        "threads": threads,
        "active": active,
        "set_nice": nice is not None,
        "set_cpus": cpus is not None,
        "set_threads": threads is not None,
    }
    return _rows(conn, SQL.node_set, params)[0]


def node_clear(conn: psycopg.Connection, host: str, *, nice: bool, cpus: bool, threads: bool) -> dict[str, Any] | None:
    params = {"host": host, "clear_nice": nice, "clear_cpus": cpus, "clear_threads": threads}
    rows = _rows(conn, SQL.node_clear, params)
    return rows[0] if rows else None


def node_delete(conn: psycopg.Connection, host: str) -> bool:
    return conn.execute(SQL.node_delete, {"host": host}).fetchone() is not None


def node_list(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(conn, SQL.node_list, {"stale_s": HEARTBEAT_STALE_S})


# ------------------------------------------------------------------- cleanup


def stuck_registering(conn: psycopg.Connection, stuck_s: float) -> list[dict[str, Any]]:
    return _rows(conn, SQL.stuck_registering, {"stuck_s": stuck_s})


def expired(conn: psycopg.Connection, retention_days: float) -> list[dict[str, Any]]:
    return _rows(conn, SQL.expired, {"retention_days": retention_days})


def expiring(conn: psycopg.Connection, retention_days: float) -> list[dict[str, Any]]:
    return _rows(conn, SQL.expiring, {"retention_days": retention_days})


def crh_candidates(conn: psycopg.Connection, host: str) -> list[dict[str, Any]]:
    return _rows(conn, SQL.crh_candidates, {"host": host})


def retrieved_to_purge(conn: psycopg.Connection, keep_s: float) -> list[dict[str, Any]]:
    return _rows(conn, SQL.retrieved_to_purge, {"keep_s": keep_s})


def purge_archives(conn: psycopg.Connection, ids: Sequence[int], keep_s: float, actor: Any) -> list[dict[str, Any]]:
    """Purge the archives of these retrieved jobs (checked again); returns each purged job with the hashes let go."""
    params = {
        "ids": list(ids),
        "keep_s": keep_s,
        "os_user": actor.os_user,
        "host": actor.host,
        "pid": actor.pid,
        "detail": Jsonb({"why": "retrieved", "keep_retrieved_s": keep_s}),
    }
    return _rows(conn, SQL.purge_archives, params)


def delete_jobs(
    conn: psycopg.Connection,
    planned: Sequence[tuple[int, str]],
    *,
    host: str,
    retention_days: float,
    stuck_s: float,
) -> list[dict[str, Any]]:
    """Delete the planned jobs still due; returns each with the hashes of the archives it referred to."""
    params = {
        "ids": [job_id for job_id, _ in planned],
        "reasons": [reason for _, reason in planned],
        "host": host,
        "retention_days": retention_days,
        "stuck_s": stuck_s,
    }
    return _rows(conn, SQL.delete_jobs, params)


def store_size(conn: psycopg.Connection) -> dict[str, int]:
    return _rows(conn, SQL.store_size)[0]
