"""Every SQL statement of the admin commands: status, show, worker/node control, cleanup.

The rules of queue.py hold here too: each answer is aggregated in SQL (never
every row fetched into Python), listings are bounded, and each deletion is
one set-based statement (archives go through store.collect_garbage).  What
the status queries read is covered by
indexes of ``schema.py``: totals by ``ix_inversions_status``, running jobs by
``ix_inversions_running``, the queue by ``ix_inversions_claim``, sipdirs by
``ix_inversions_sipdir``, a job's events by ``ix_events_job_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

# Channel a worker may LISTEN on to hear a drain/stop request at once (it also reads it with its heartbeat).
CONTROL_CHANNEL = "crh_worker_control"

# A worker not stopped whose heartbeat is older than this is shown as lost.
HEARTBEAT_STALE_S = 60

# --------------------------------------------------------------------- scope
#
# ``--mine`` narrows every job query to the caller's jobs from this computer.
# The fragment is a constant (never user text): the values are parameters.

_MINE = " AND {a}username = %(username)s AND {a}source_computer = %(host)s"


def _scope(mine: bool, alias: str = "") -> str:
    return _MINE.format(a=f"{alias}." if alias else "") if mine else ""


def _rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def _params(mine_user: tuple[str, str] | None, **extra: Any) -> dict[str, Any]:
    username, host = mine_user or (None, None)
    return {"username": username, "host": host, **extra}


# -------------------------------------------------------------------- status

# Read from ix_inversions_status alone (an index-only scan): no other column may appear here.
_TOTALS = """
SELECT status, count(*) AS jobs
FROM inversions WHERE true{scope}
GROUP BY status
"""

_RUNNING = """
SELECT j.id, j.username, j.source_computer, j.source_path, j.sipdir, j.job_group, j.sim_type, j.threads,
       j.attempt, j.tries, j.max_attempts, j.worker_id, w.name AS worker, coalesce(w.host, j.inv_computer) AS host,
       j.datetime_started AS started, extract(epoch FROM now() - j.datetime_started)::float8 AS elapsed_s,
       j.lease_expires
FROM inversions j LEFT JOIN workers w ON w.id = j.worker_id
WHERE j.status = 'running'{scope}
ORDER BY j.datetime_started, j.id
LIMIT %(limit)s
"""

_FAILED = """
SELECT j.id, j.username, j.source_computer, j.source_path, j.sipdir, j.job_group, j.sim_type, j.attempt,
       j.inv_computer AS host, j.exit_code, j.failure_category, j.failure_reason, j.datetime_finished AS finished
FROM inversions j
WHERE j.status = 'failed' AND NOT j.downloaded{scope}
ORDER BY j.datetime_finished DESC NULLS LAST, j.id DESC
LIMIT %(limit)s
"""

_FAILURE_CATEGORIES = """
SELECT coalesce(failure_category, 'unknown') AS category, count(*) AS jobs
FROM inversions WHERE status = 'failed' AND NOT downloaded{scope}
GROUP BY 1 ORDER BY jobs DESC, category
"""

_QUEUE_DEPTH = """
SELECT username, job_group AS "group",
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'running') AS running,
       max(priority) FILTER (WHERE status = 'queued') AS top_priority,
       min(datetime_queued) FILTER (WHERE status = 'queued') AS oldest_queued
FROM inversions WHERE status IN ('queued', 'running'){scope}
GROUP BY username, job_group
ORDER BY queued DESC, running DESC, username, job_group NULLS FIRST
"""

# A sipdir is of interest while one of its frequencies can still be retrieved.  The
# most recent of those are chosen first from the few columns that say so, then only
# their jobs are counted (through ix_inversions_sipdir).
_SIPDIRS = """
WITH active AS (
    SELECT sipdir, source_computer, max(datetime_init) AS added
    FROM inversions
    WHERE sipdir IS NOT NULL AND NOT downloaded AND status <> 'cancelled'{scope}
    GROUP BY sipdir, source_computer
), top AS (
    SELECT sipdir, source_computer, added, count(*) OVER () AS listed_of
    FROM active ORDER BY added DESC, sipdir LIMIT %(limit)s
)
SELECT t.sipdir, t.source_computer, min(j.username) AS username,
       count(*) AS total,
       count(*) FILTER (WHERE j.status = 'finished') AS finished,
       count(*) FILTER (WHERE j.status = 'failed') AS failed,
       count(*) FILTER (WHERE j.status = 'running') AS running,
       count(*) FILTER (WHERE j.status IN ('registering', 'queued')) AS queued,
       count(*) FILTER (WHERE j.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE j.downloaded) AS retrieved,
       max(t.added) AS added,
       max(t.listed_of) AS listed_of
FROM top t JOIN inversions j ON j.sipdir = t.sipdir AND j.source_computer = t.source_computer
WHERE true{scope_j}
GROUP BY t.sipdir, t.source_computer
ORDER BY max(t.added) DESC, t.sipdir
"""

_WORKERS = f"""
SELECT w.id, w.name, w.host, w.pid, w.version, w.db_role,
       CASE WHEN w.state <> 'stopped' AND w.last_heartbeat < now() - make_interval(secs => {HEARTBEAT_STALE_S})
            THEN 'lost' ELSE w.state END AS state,
       w.requested, w.jobs, w.threads,
       -- A CPU budget column may be added later; read it without naming it so this keeps working.
       (to_jsonb(w) ->> 'cpus')::int AS cpus,
       w.groups, w.solvers, w.datetime_started AS started, w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat)::float8 AS heartbeat_age_s,
       w.datetime_stopped AS stopped, w.stop_reason,
       (SELECT count(*) FROM inversions j WHERE j.status = 'running' AND j.worker_id = w.id) AS held
FROM workers w
WHERE {{where}}
ORDER BY w.state = 'stopped', w.host, w.name, w.id
LIMIT %(limit)s
"""

_WORKERS_LIVE_OR_RECENT = "w.state <> 'stopped' OR w.datetime_stopped > now() - interval '1 hour'"

_WORKER_COUNTS = """
SELECT count(*) FILTER (WHERE state <> 'stopped') AS not_stopped,
       count(*) FILTER (WHERE state = 'stopped') AS stopped
FROM workers
"""

# The median runtime of the most recent finished jobs (the last attempt of each).  The
# newest are found per host through ix_inversions_finished (inv_computer, datetime_finished):
# a loose index scan lists the hosts, then each host's newest jobs are read backwards.
_RECENT_RUNTIME = """
WITH RECURSIVE hosts AS (
    SELECT min(inv_computer) AS host FROM inversions
    UNION ALL
    SELECT (SELECT min(inv_computer) FROM inversions WHERE inv_computer > hosts.host)
    FROM hosts WHERE hosts.host IS NOT NULL
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY runtime_s) AS median_s, count(*) AS sample
FROM (
    SELECT r.runtime_s
    FROM hosts CROSS JOIN LATERAL (
        SELECT j.datetime_finished, extract(epoch FROM j.datetime_finished - j.datetime_started)::float8 AS runtime_s
        FROM inversions j
        WHERE j.inv_computer = hosts.host AND j.status = 'finished' AND j.datetime_started IS NOT NULL
          AND j.datetime_finished > now() - interval '7 days'
        ORDER BY j.datetime_finished DESC
        LIMIT %(sample)s
    ) r
    WHERE hosts.host IS NOT NULL
    ORDER BY r.datetime_finished DESC
    LIMIT %(sample)s
) recent
"""

_NOW = "SELECT now()"

# Whether the caller sees every job (admin, worker, table owner) or, under row security,
# only its own; the others see everyone's jobs only as anonymous counts (migration 0003).
_PRIVILEGED = "SELECT crh_privileged()"
_QUEUE_COUNTS = "SELECT status, job_group AS \"group\", jobs FROM crh_queue_counts()"


# May change every row: a member of crh_admin, or the owner of the tables (the embedded database).
_IS_ADMIN = """
SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'crh_admin')
            THEN pg_has_role('crh_admin', 'USAGE') ELSE false END
    OR pg_has_role((SELECT relowner FROM pg_class WHERE oid = 'inversions'::regclass), 'USAGE')
"""


def is_admin(conn: psycopg.Connection) -> bool:
    return bool(conn.execute(_IS_ADMIN).fetchone()[0])


def privileged(conn: psycopg.Connection) -> bool:
    return bool(conn.execute(_PRIVILEGED).fetchone()[0])


def queue_counts(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(conn, _QUEUE_COUNTS)


def now(conn: psycopg.Connection):
    return conn.execute(_NOW).fetchone()[0]


def totals(conn: psycopg.Connection, mine: tuple[str, str] | None) -> list[dict[str, Any]]:
    return _rows(conn, _TOTALS.format(scope=_scope(bool(mine))), _params(mine))


def running_jobs(conn: psycopg.Connection, mine: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    return _rows(conn, _RUNNING.format(scope=_scope(bool(mine), "j")), _params(mine, limit=limit))


def failed_jobs(conn: psycopg.Connection, mine: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    return _rows(conn, _FAILED.format(scope=_scope(bool(mine), "j")), _params(mine, limit=limit))


def failure_categories(conn: psycopg.Connection, mine: tuple[str, str] | None) -> list[dict[str, Any]]:
    return _rows(conn, _FAILURE_CATEGORIES.format(scope=_scope(bool(mine))), _params(mine))


def queue_depth(conn: psycopg.Connection, mine: tuple[str, str] | None) -> list[dict[str, Any]]:
    return _rows(conn, _QUEUE_DEPTH.format(scope=_scope(bool(mine))), _params(mine))


def sipdirs(conn: psycopg.Connection, mine: tuple[str, str] | None, limit: int) -> list[dict[str, Any]]:
    query = _SIPDIRS.format(scope=_scope(bool(mine)), scope_j=_scope(bool(mine), "j"))
    return _rows(conn, query, _params(mine, limit=limit))


def workers(conn: psycopg.Connection, *, include_stopped: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
    where = "true" if include_stopped else _WORKERS_LIVE_OR_RECENT
    return _rows(conn, _WORKERS.format(where=where), {"limit": limit})


def worker_counts(conn: psycopg.Connection) -> dict[str, int]:
    return _rows(conn, _WORKER_COUNTS)[0]


def recent_runtime(conn: psycopg.Connection, sample: int) -> dict[str, Any]:
    return _rows(conn, _RECENT_RUNTIME, {"sample": sample})[0]


_JOB_STATES = """
SELECT id, status, downloaded, sim_type, attempt, inv_computer, failure_category, failure_reason,
       sipdir, datetime_finished AS finished
FROM inversions WHERE id = ANY(%s)
"""


def job_states(conn: psycopg.Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The state of many jobs by id in one query (the tree mode of status)."""
    return {row["id"]: row for row in _rows(conn, _JOB_STATES, (list(ids),))}


# ---------------------------------------------------------------------- show

_SHOW_JOBS = """
SELECT j.*, w.name AS worker_name, w.host AS worker_host,
       bi.size AS input_size, br.size AS result_size
FROM inversions j
LEFT JOIN workers w ON w.id = j.worker_id
LEFT JOIN blobs bi ON bi.sha256 = j.input_sha256
LEFT JOIN blobs br ON br.sha256 = j.result_sha256
WHERE j.id = ANY(%s)
ORDER BY j.id
"""

_SHOW_EVENTS = """
SELECT e.job_id, e.id, e.datetime, e.event, e.status, e.attempt, e.db_role, e.os_user, e.host, e.pid,
       e.worker_id, w.name AS worker_name, e.detail
FROM events e LEFT JOIN workers w ON w.id = e.worker_id
WHERE e.job_id = ANY(%s)
ORDER BY e.job_id, e.id
"""


def show_jobs(conn: psycopg.Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(conn, _SHOW_JOBS, (list(ids),))


def show_events(conn: psycopg.Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(conn, _SHOW_EVENTS, (list(ids),))


# -------------------------------------------------------- worker remote control

_FIND_WORKERS = """
SELECT w.id, w.name, w.host, w.pid, w.state, w.requested,
       extract(epoch FROM now() - w.last_heartbeat)::float8 AS heartbeat_age_s
FROM workers w
WHERE w.id = ANY(%(ids)s) OR w.name = ANY(%(names)s) OR w.host = ANY(%(hosts)s)
ORDER BY w.id
"""

# 'stop' overrides an earlier 'drain'; 'drain' never softens an earlier 'stop'.
_REQUEST = f"""
UPDATE workers SET requested = %(request)s
WHERE id = ANY(%(ids)s) AND state <> 'stopped'
  AND (requested IS NULL OR requested = %(request)s OR %(request)s = 'stop')
RETURNING id, name, host, requested, pg_notify('{CONTROL_CHANNEL}', id::text || ' ' || %(request)s)
"""


def find_workers(
    conn: psycopg.Connection, *, ids: Sequence[int] = (), names: Sequence[str] = (), hosts: Sequence[str] = ()
) -> list[dict[str, Any]]:
    params = {"ids": list(ids), "names": list(names), "hosts": list(hosts)}
    return _rows(conn, _FIND_WORKERS, params)


def request_workers(conn: psycopg.Connection, ids: Sequence[int], request: str) -> list[dict[str, Any]]:
    """Ask workers to drain or stop; they read it with their next heartbeat (or at once by NOTIFY)."""
    if request not in ("drain", "stop"):
        raise ValueError(f"unknown request {request!r}")
    rows = _rows(conn, _REQUEST, {"ids": list(ids), "request": request})
    for row in rows:
        row.pop("pg_notify", None)
    return rows


# -------------------------------------------------------------- node settings

_NODE_SET = """
INSERT INTO node_settings AS n (host, nice, cpus, threads, active, datetime_updated)
VALUES (%(host)s, %(nice)s, %(cpus)s, %(threads)s, coalesce(%(active)s, true), now())
ON CONFLICT (host) DO UPDATE SET
    nice = CASE WHEN %(set_nice)s THEN EXCLUDED.nice ELSE n.nice END,
    cpus = CASE WHEN %(set_cpus)s THEN EXCLUDED.cpus ELSE n.cpus END,
    threads = CASE WHEN %(set_threads)s THEN EXCLUDED.threads ELSE n.threads END,
    active = coalesce(%(active)s, n.active),
    datetime_updated = now()
RETURNING host, nice, cpus, threads, active, datetime_updated AS updated
"""

_NODE_CLEAR = """
UPDATE node_settings SET
    nice = CASE WHEN %(clear_nice)s THEN NULL ELSE nice END,
    cpus = CASE WHEN %(clear_cpus)s THEN NULL ELSE cpus END,
    threads = CASE WHEN %(clear_threads)s THEN NULL ELSE threads END,
    datetime_updated = now()
WHERE host = %(host)s
RETURNING host, nice, cpus, threads, active, datetime_updated AS updated
"""

_NODE_DELETE = "DELETE FROM node_settings WHERE host = %s RETURNING host"

_NODE_LIST = f"""
SELECT n.host, n.nice, n.cpus, n.threads, n.active, n.datetime_updated AS updated,
       (SELECT count(*) FROM workers w
        WHERE w.host = n.host AND w.state <> 'stopped'
          AND w.last_heartbeat >= now() - make_interval(secs => {HEARTBEAT_STALE_S})) AS live_workers
FROM node_settings n
ORDER BY n.host
"""


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
    return _rows(conn, _NODE_SET, params)[0]


def node_clear(conn: psycopg.Connection, host: str, *, nice: bool, cpus: bool, threads: bool) -> dict[str, Any] | None:
    rows = _rows(conn, _NODE_CLEAR, {"host": host, "clear_nice": nice, "clear_cpus": cpus, "clear_threads": threads})
    return rows[0] if rows else None


def node_delete(conn: psycopg.Connection, host: str) -> bool:
    return conn.execute(_NODE_DELETE, (host,)).fetchone() is not None


def node_list(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(conn, _NODE_LIST)


# ------------------------------------------------------------------- cleanup

ENDED = ("finished", "failed", "cancelled")
# States in which a job whose .crh is gone may be deleted: not while a worker runs it,
# not while crh_add is still writing it (stuck registrations have their own rule).
CRH_GONE_STATES = ("queued",) + ENDED

_STUCK_REGISTERING = """
SELECT id, status, username, source_computer, source_path, crh_file, datetime_init AS since
FROM inversions
WHERE status = 'registering' AND datetime_init < now() - make_interval(secs => %(stuck_s)s)
ORDER BY id
"""

_EXPIRED = """
SELECT id, status, username, source_computer, source_path, crh_file, datetime_finished AS since
FROM inversions
WHERE status IN ('finished', 'failed', 'cancelled') AND NOT downloaded
  AND datetime_finished < now() - (%(retention_days)s * interval '1 day')
ORDER BY id
"""

# Ended, not retrieved, and due within the next week: the warning before the purge.
_EXPIRING = """
SELECT id, status, username, source_computer, source_path, crh_file, datetime_finished AS since,
       datetime_finished + (%(retention_days)s * interval '1 day') AS purge_after
FROM inversions
WHERE status IN ('finished', 'failed', 'cancelled') AND NOT downloaded
  AND datetime_finished >= now() - (%(retention_days)s * interval '1 day')
  AND datetime_finished < now() - (%(retention_days)s * interval '1 day') + interval '7 days'
ORDER BY datetime_finished, id
"""

# The not yet retrieved jobs of one computer whose .crh files are to be checked on disk.
_CRH_CANDIDATES = """
SELECT id, status, username, source_computer, source_path, crh_file, datetime_init AS since
FROM inversions
WHERE source_computer = %(host)s AND NOT downloaded AND status = ANY(%(states)s)
ORDER BY id
"""

# Archive references by jobs that stay: an anti-join, never a probe per blob.
_REFS = """
doomed AS (SELECT unnest(%(doomed)s::bigint[]) AS id),
refs AS (
    SELECT j.input_sha256 AS sha256 FROM inversions j
    WHERE j.input_sha256 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM doomed d WHERE d.id = j.id)
    UNION
    SELECT j.result_sha256 FROM inversions j
    WHERE j.result_sha256 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM doomed d WHERE d.id = j.id)
)
"""

# Complete blobs no remaining job refers to, and uploads that never completed.  Both only
# after a grace period, so an upload being sealed or registered right now is never taken.
_BLOB_CONDITION = """
(
    (b.complete AND coalesce(b.datetime_completed, b.datetime_created) < now() - make_interval(secs => %(grace_s)s)
     AND NOT EXISTS (SELECT 1 FROM refs r WHERE r.sha256 = b.sha256))
    OR (NOT b.complete AND b.datetime_created < now() - make_interval(secs => %(grace_s)s))
)
"""

_ORPHAN_BLOBS = f"""
WITH {_REFS}
SELECT b.id, b.sha256, b.complete, b.datetime_created AS created,
       CASE WHEN b.complete THEN b.size
            ELSE (SELECT coalesce(sum(pg_column_size(c.data)), 0) FROM binary_data c WHERE c.blob_id = b.id)
       END::bigint AS bytes
FROM blobs b
WHERE {_BLOB_CONDITION}
ORDER BY b.id
"""

# One statement deletes every planned job, each checked again against the rule that
# selected it: a job retrieved, claimed or completed since the plan is kept.  Their
# events go with them (ON DELETE CASCADE); blobs are left to the statement below.
_DELETE_JOBS = """
DELETE FROM inversions j
USING unnest(%(ids)s::bigint[], %(reasons)s::text[]) AS p(id, reason)
WHERE j.id = p.id AND (
    (p.reason = 'stuck_registering' AND j.status = 'registering'
        AND j.datetime_init < now() - make_interval(secs => %(stuck_s)s))
    OR (p.reason = 'expired' AND j.status IN ('finished', 'failed', 'cancelled') AND NOT j.downloaded
        AND j.datetime_finished < now() - (%(retention_days)s * interval '1 day'))
    OR (p.reason = 'crh_missing' AND j.status = ANY(%(crh_states)s) AND NOT j.downloaded
        AND j.source_computer = %(host)s)
)
RETURNING j.id
"""

_EXISTING_BLOBS = "SELECT id FROM blobs WHERE id = ANY(%s)"

_STORE_SIZE = """
SELECT pg_total_relation_size('binary_data') AS binary_data, pg_total_relation_size('blobs') AS blobs,
       pg_total_relation_size('inversions') AS inversions, pg_total_relation_size('events') AS events
"""


def stuck_registering(conn: psycopg.Connection, stuck_s: float) -> list[dict[str, Any]]:
    return _rows(conn, _STUCK_REGISTERING, {"stuck_s": stuck_s})


def expired(conn: psycopg.Connection, retention_days: float) -> list[dict[str, Any]]:
    return _rows(conn, _EXPIRED, {"retention_days": retention_days})


def expiring(conn: psycopg.Connection, retention_days: float) -> list[dict[str, Any]]:
    return _rows(conn, _EXPIRING, {"retention_days": retention_days})


def crh_candidates(conn: psycopg.Connection, host: str) -> list[dict[str, Any]]:
    return _rows(conn, _CRH_CANDIDATES, {"host": host, "states": list(CRH_GONE_STATES)})


def orphan_blobs(conn: psycopg.Connection, doomed_jobs: Sequence[int], grace_s: float) -> list[dict[str, Any]]:
    """Blobs no job refers to once ``doomed_jobs`` are gone, and interrupted uploads."""
    return _rows(conn, _ORPHAN_BLOBS, {"doomed": list(doomed_jobs), "grace_s": grace_s})


def delete_jobs(
    conn: psycopg.Connection,
    planned: Sequence[tuple[int, str]],
    *,
    host: str,
    retention_days: float,
    stuck_s: float,
) -> list[int]:
    params = {
        "ids": [job_id for job_id, _ in planned],
        "reasons": [reason for _, reason in planned],
        "host": host,
        "retention_days": retention_days,
        "stuck_s": stuck_s,
        "crh_states": list(CRH_GONE_STATES),
    }
    return [row[0] for row in conn.execute(_DELETE_JOBS, params)]


def existing_blobs(conn: psycopg.Connection, ids: Sequence[int]) -> list[int]:
    return [row[0] for row in conn.execute(_EXISTING_BLOBS, (list(ids),))]


def store_size(conn: psycopg.Connection) -> dict[str, int]:
    return _rows(conn, _STORE_SIZE)[0]
