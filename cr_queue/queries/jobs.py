"""Every SQL statement about jobs and workers: the job lifecycle in one place.

Each state change is one short statement that also writes its event row, so
the history can never disagree with the state.  Writes a worker makes about a
job name the attempt it holds (fencing): a write for an attempt that is no
longer current changes nothing and the caller learns it was refused.

A live worker holds a session advisory lock on its own id (on its heartbeat
connection) and beats every few seconds.  When the worker dies its
connection drops, the lock vanishes, its heartbeat stops, and the next rescue
sweep returns its jobs to the queue within seconds, long before their leases
run out.  Requiring both signals keeps a short network blip or a database
restart (which drops every lock at once) from taking jobs away from workers
that are still alive and will reconnect.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

# First key of the two-key advisory locks of live workers (the second is the worker id).
LOCK_NAMESPACE = 17234
CHANNEL = "crh_jobs"
CANCEL_CHANNEL = "crh_cancel"
# A worker whose lock is gone and whose heartbeat is older than this is lost.
RESCUE_GRACE_S = 5.0


@dataclass(frozen=True)
class Actor:
    """Who is acting: written into every event row (the database adds its role)."""

    os_user: str = field(default_factory=getpass.getuser)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    worker_id: int | None = None


@dataclass
class Job:
    id: int
    status: str
    sim_type: str
    model_first: bool
    username: str
    source_computer: str
    source_path: str
    crh_file: str
    priority: int
    job_group: str | None
    sipdir: str | None
    threads: int
    timeout_s: int | None
    attempt: int
    tries: int
    max_attempts: int
    worker_id: int | None
    inv_computer: str | None
    input_sha256: str | None
    result_sha256: str | None
    exit_code: int | None
    failure_category: str | None
    failure_reason: str | None
    datetime_init: datetime | None
    datetime_started: datetime | None
    datetime_finished: datetime | None
    downloaded: bool

    @property
    def steps(self) -> tuple[str, ...]:
        if self.sim_type == "mod":
            return ("mod",)
        return ("mod", "inv") if self.model_first else ("inv",)


_JOB_COLUMNS = ", ".join(f"j.{name}" for name in Job.__dataclass_fields__)

_EVENT_COLUMNS = "job_id, event, status, attempt, os_user, host, pid, worker_id, detail"


def _event_values(event: str) -> str:
    return (
        f"SELECT u.id, '{event}', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, "
        "%(worker_id)s, %(detail)s FROM u"
    )


def _with_event(event: str, change: str, *, before: str = "", result: str = "SELECT id FROM u") -> str:
    """One statement that changes jobs (CTE ``u``, returning id, status, attempt) and
    records an event row for each, so the history can never disagree with the state."""
    ctes = f"{before},\n" if before else ""
    return (
        f"WITH {ctes}u AS (\n{change}\n), e AS (\n"
        f"    INSERT INTO events ({_EVENT_COLUMNS}) {_event_values(event)}\n)\n{result}\n"
    )


def _actor(actor: Actor, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "os_user": actor.os_user,
        "host": actor.host,
        "pid": actor.pid,
        "worker_id": actor.worker_id,
        "detail": Jsonb(detail or {}),
    }


# ---------------------------------------------------------------- registration

_REUSE_REGISTERING = """
SELECT id FROM inversions
WHERE status = 'registering' AND source_computer = %(source_computer)s AND source_path = %(source_path)s
ORDER BY id LIMIT 1 FOR UPDATE
"""

_UPDATE_REGISTERING = """
UPDATE inversions SET sim_type = %(sim_type)s, model_first = %(model_first)s, username = %(username)s,
    crh_file = %(crh_file)s, priority = %(priority)s, job_group = %(job_group)s, threads = %(threads)s,
    timeout_s = %(timeout_s)s, max_attempts = %(max_attempts)s, sipdir = %(sipdir)s, datetime_init = now()
WHERE id = %(id)s
"""

_INSERT_REGISTERING = _with_event(
    "registering",
    """
    INSERT INTO inversions (status, sim_type, model_first, username, source_computer, source_path,
                            crh_file, priority, job_group, threads, timeout_s, max_attempts, sipdir)
    VALUES ('registering', %(sim_type)s, %(model_first)s, %(username)s, %(source_computer)s,
            %(source_path)s, %(crh_file)s, %(priority)s, %(job_group)s, %(threads)s, %(timeout_s)s,
            %(max_attempts)s, %(sipdir)s)
    RETURNING id, status, attempt
""",
)


@dataclass(frozen=True)
class NewJob:
    sim_type: str
    model_first: bool
    source_path: str
    crh_file: str
    username: str
    source_computer: str
    priority: int = 0
    job_group: str | None = None
    threads: int = 1
    timeout_s: int | None = None
    max_attempts: int = 3
    sipdir: str | None = None


def begin_registration(conn: psycopg.Connection, new: NewJob, actor: Actor) -> int:
    """Create the job row in 'registering', where no worker can see it.

    A row left in 'registering' by an interrupted crh_add for the same
    directory is taken over instead of adding a second one.
    """
    return begin_registrations(conn, [new], actor)[0]


def begin_registrations(conn: psycopg.Connection, news: list[NewJob], actor: Actor) -> list[int]:
    """:func:`begin_registration` for many tomodirs in one transaction (one commit, not one each),
    the statements pipelined; returns the job ids in the order of ``news``."""
    ids: list[int] = []
    with conn.pipeline(), conn.transaction():
        reused = []
        for new in news:
            params = {**new.__dict__, **_actor(actor)}
            reused.append((conn.execute(_REUSE_REGISTERING, params), params))
        pending = []
        for cur, params in reused:
            row = cur.fetchone()
            if row is not None:
                conn.execute(_UPDATE_REGISTERING, {**params, "id": row[0]})
                pending.append(row[0])
            else:
                pending.append(conn.execute(_INSERT_REGISTERING, params))
        for entry in pending:
            ids.append(entry if isinstance(entry, int) else entry.fetchone()[0])
    return ids


def finish_registration(conn: psycopg.Connection, job_id: int, sha256: str, actor: Actor) -> bool:
    """Make a registered job claimable; False when it was not (or no longer) registering."""
    return job_id in finish_registrations(conn, [(job_id, sha256)], actor)


# Making registered jobs claimable, in the batch's order.  A new job's rank: after
# its user's last waiting job, but never behind the front of the queue, so a user
# who adds 10 jobs behind another's 5,000 is served in turns with them rather than
# after them (a user's jobs of one batch get consecutive ranks).  The front comes
# from crh_queue_front(): with per-user roles, row-level security hides others' jobs.
# Each event's detail names the archive.
_FINISH_REGISTRATIONS = f"""
WITH req AS MATERIALIZED (
    SELECT r.id, r.sha256, r.ord, j.username
    FROM unnest(%(ids)s::bigint[], %(shas)s::text[]) WITH ORDINALITY AS r(id, sha256, ord)
    JOIN inversions j ON j.id = r.id AND j.status = 'registering'
), front AS MATERIALIZED (
    SELECT crh_queue_front() - 1 AS rank
), base AS MATERIALIZED (
    SELECT username, greatest(
        (SELECT max(fair_rank) FROM inversions WHERE status = 'queued' AND username = users.username),
        (SELECT rank FROM front),
        0) AS rank
    FROM (SELECT DISTINCT username FROM req) users
), rank AS MATERIALIZED (
    SELECT req.id, req.sha256, base.rank + row_number() OVER (PARTITION BY req.username ORDER BY req.ord) AS fair_rank
    FROM req JOIN base USING (username)
), u AS (
    UPDATE inversions SET status = 'queued', input_sha256 = r.sha256, datetime_queued = now(), fair_rank = r.fair_rank
    FROM rank r
    WHERE inversions.id = r.id AND inversions.status = 'registering'
    RETURNING inversions.id, inversions.status, inversions.attempt, inversions.input_sha256
), e AS (
    INSERT INTO events ({_EVENT_COLUMNS})
    SELECT u.id, 'queued', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s,
           jsonb_build_object('sha256', u.input_sha256)
    FROM u
)
SELECT id FROM u
"""


def finish_registrations(conn: psycopg.Connection, done: list[tuple[int, str]], actor: Actor) -> set[int]:
    """:func:`finish_registration` for many ``(job_id, sha256)`` in one statement; returns the ids made claimable."""
    if not done:
        return set()
    params = {"ids": [job_id for job_id, _ in done], "shas": [sha for _, sha in done], **_actor(actor)}
    return {row[0] for row in conn.execute(_FINISH_REGISTRATIONS, params).fetchall()}


_DUPLICATES = """
SELECT r.job_id, (
    SELECT j.id FROM inversions j
    WHERE j.source_computer = %s AND j.source_path = r.source_path AND j.input_sha256 = r.sha256
      AND j.status IN ('queued', 'running') AND j.id <> r.job_id
    ORDER BY j.id LIMIT 1)
FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS r(job_id, source_path, sha256)
"""

_DROP_REGISTRATION = "DELETE FROM inversions WHERE id = %s AND status = 'registering'"


def find_duplicate(conn: psycopg.Connection, source_computer: str, source_path: str, sha256: str, job_id: int) -> int | None:
    """A job with the same content from the same directory that is still waiting or running."""
    return find_duplicates(conn, source_computer, [(job_id, source_path, sha256)])[job_id]


def find_duplicates(conn: psycopg.Connection, source_computer: str, jobs: list[tuple[int, str, str]]) -> dict[int, int | None]:
    """:func:`find_duplicate` for many ``(job_id, source_path, sha256)`` in one statement: job_id -> duplicate or None."""
    if not jobs:
        return {}
    ids, paths, shas = (list(column) for column in zip(*jobs))
    return dict(conn.execute(_DUPLICATES, (source_computer, ids, paths, shas)).fetchall())


def drop_registration(conn: psycopg.Connection, job_id: int) -> None:
    """Forget a registration that will not be completed (nobody could ever have claimed it)."""
    conn.execute(_DROP_REGISTRATION, (job_id,))


# ------------------------------------------------------------------- reading

_GET_JOBS = f"SELECT {_JOB_COLUMNS} FROM inversions j WHERE j.id = ANY(%s)"


def get_jobs(conn: psycopg.Connection, ids: Iterable[int]) -> dict[int, Job]:
    with conn.cursor(row_factory=class_row(Job)) as cur:
        return {job.id: job for job in cur.execute(_GET_JOBS, (list(ids),))}


def get_job(conn: psycopg.Connection, job_id: int) -> Job | None:
    return get_jobs(conn, [job_id]).get(job_id)


_EVENTS = """
SELECT datetime, event, status, attempt, db_role, os_user, host, pid, worker_id, detail
FROM events WHERE job_id = %s ORDER BY id
"""


def events_of(conn: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_EVENTS, (job_id,)).fetchall()


# ------------------------------------------------------------------- workers

_REGISTER_WORKER = """
INSERT INTO workers (name, host, pid, version, jobs, threads, groups, solvers)
VALUES (%(name)s, %(host)s, %(pid)s, %(version)s, %(jobs)s, %(threads)s, %(groups)s, %(solvers)s)
RETURNING id
"""

_WORKER_HEARTBEAT = "UPDATE workers SET last_heartbeat = now() WHERE id = %s"

_BEAT = """
WITH w AS (
    UPDATE workers SET last_heartbeat = now(),
        state = CASE WHEN %(draining)s AND state = 'running' THEN 'draining' ELSE state END
    WHERE id = %(id)s
    RETURNING host, requested
)
SELECT w.requested, n.nice, n.cpus, n.threads, n.active FROM w LEFT JOIN node_settings n ON n.host = w.host
"""


@dataclass(frozen=True)
class Orders:
    """What the database tells a worker at each beat: an admin's request and its node's settings."""

    requested: str | None = None
    nice: int | None = None
    cpus: int | None = None
    threads: int | None = None
    active: bool = True


def beat(conn: psycopg.Connection, worker_id: int, *, draining: bool) -> Orders:
    row = conn.execute(_BEAT, {"id": worker_id, "draining": draining}).fetchone()
    if row is None:
        return Orders()
    requested, nice, cpus, threads, active = row
    return Orders(requested, nice, cpus, threads, True if active is None else active)

_STOP_WORKER = """
UPDATE workers SET state = 'stopped', datetime_stopped = now(), stop_reason = %s WHERE id = %s
"""


def register_worker(
    conn: psycopg.Connection,
    *,
    name: str,
    host: str,
    pid: int,
    version: str,
    jobs: int,
    threads: int,
    groups: Sequence[str],
    solvers: dict[str, Any],
) -> int:
    params = {
        "name": name,
        "host": host,
        "pid": pid,
        "version": version,
        "jobs": jobs,
        "threads": threads,
        "groups": list(groups),
        "solvers": Jsonb(solvers),
    }
    return conn.execute(_REGISTER_WORKER, params).fetchone()[0]


def stop_worker(conn: psycopg.Connection, worker_id: int, reason: str) -> None:
    conn.execute(_STOP_WORKER, (reason, worker_id))


# --------------------------------------------------------------------- claim

_CLAIM = _with_event(
    "claimed",
    """
    UPDATE inversions j
    SET status = 'running', attempt = j.attempt + 1, tries = j.tries + 1,
        worker_id = %(worker_id)s, inv_computer = %(host)s, datetime_started = now(),
        lease_expires = now() + make_interval(secs => %(lease_s)s),
        exit_code = NULL, failure_category = NULL, failure_reason = NULL
    FROM next WHERE j.id = next.id
    RETURNING j.*
""",
    before="""
next AS (
    SELECT id FROM inversions
    WHERE status = 'queued'
      AND ((sim_type = 'mod' AND %(can_mod)s)
           OR (sim_type = 'inv' AND %(can_inv)s AND (NOT model_first OR %(can_mod)s)))
      AND (CASE WHEN cardinality(%(groups)s::text[]) = 0 THEN job_group IS NULL
                ELSE job_group = ANY(%(groups)s::text[]) END)
      AND (%(max_threads)s::int IS NULL OR threads <= %(max_threads)s::int)
    ORDER BY priority DESC, fair_rank, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
""",
    result=f"SELECT {_JOB_COLUMNS.replace('j.', 'u.')} FROM u",
)


def claim(
    conn: psycopg.Connection,
    *,
    actor: Actor,
    can_mod: bool,
    can_inv: bool,
    groups: Sequence[str] = (),
    lease_s: float,
    max_threads: int | None = None,
) -> Job | None:
    """Take the best queued job this worker can run, in one short transaction."""
    params = {
        "can_mod": can_mod,
        "can_inv": can_inv,
        "groups": list(groups),
        "lease_s": lease_s,
        "max_threads": max_threads,
        "worker_id": actor.worker_id,
        **_actor(actor),
    }
    with conn.cursor(row_factory=class_row(Job)) as cur:
        return cur.execute(_CLAIM, params).fetchone()


def hold_worker_lock(conn: psycopg.Connection, worker_id: int) -> bool:
    """Take the lock that says "this worker is alive" for as long as ``conn`` lives."""
    return bool(conn.execute("SELECT pg_try_advisory_lock(%s, %s::int)", (LOCK_NAMESPACE, worker_id)).fetchone()[0])


def bound_idle_transactions(conn: psycopg.Connection, seconds: float) -> None:
    """Have the server end this session if it leaves a transaction open for ``seconds``.

    A worker's transactions are a few statements sent back to back, so one left
    open means the worker was cut off mid-transaction (half-open connection).
    Its row locks would hide the job from the rescue sweep (SKIP LOCKED) until
    the server's TCP keepalive gives up, two hours later by default.
    """
    conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (f"{max(1, int(seconds * 1000))}ms",)
    )


# ------------------------------------------------------ heartbeats and leases

_RENEW = """
UPDATE inversions j SET lease_expires = now() + make_interval(secs => %(lease_s)s)
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS held(id, attempt)
WHERE j.id = held.id AND j.attempt = held.attempt AND j.status = 'running'
  AND j.worker_id = %(worker_id)s
RETURNING j.id
"""


def renew(
    conn: psycopg.Connection, worker_id: int, held: Sequence[tuple[int, int]], lease_s: float
) -> set[int]:
    """Extend the leases of the jobs a worker holds; returns the ids still its own."""
    with conn.transaction():
        conn.execute(_WORKER_HEARTBEAT, (worker_id,))
        if not held:
            return set()
        params = {
            "ids": [job_id for job_id, _ in held],
            "attempts": [attempt for _, attempt in held],
            "worker_id": worker_id,
            "lease_s": lease_s,
        }
        return {row[0] for row in conn.execute(_RENEW, params)}


# ------------------------------------------------------------------- outcome

_COMPLETE = _with_event(
    "finished",
    """
    UPDATE inversions SET status = 'finished', result_sha256 = %(result_sha256)s,
        exit_code = %(exit_code)s, datetime_finished = now(), lease_expires = NULL
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, status, attempt
""",
)

_FAIL = _with_event(
    "failed",
    """
    UPDATE inversions SET status = 'failed', result_sha256 = %(result_sha256)s,
        exit_code = %(exit_code)s, failure_category = %(category)s, failure_reason = %(reason)s,
        datetime_finished = now(), lease_expires = NULL
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, status, attempt
""",
)

_RELEASE = _with_event(
    "released",
    """
    UPDATE inversions SET status = 'queued', tries = greatest(tries - 1, 0), worker_id = NULL,
        lease_expires = NULL, datetime_queued = now()
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, status, attempt
""",
)

# A fenced write whose answer was lost (the connection dropped after the commit)
# is retried; the retry changes nothing, and this tells it the first try went through.
_OWN_OUTCOME = """
SELECT EXISTS (
    SELECT 1 FROM inversions
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = %(status)s AND worker_id = %(worker_id)s
      AND result_sha256 IS NOT DISTINCT FROM %(result_sha256)s
)
"""


def _already_recorded(conn: psycopg.Connection, params: dict[str, Any], status: str) -> bool:
    return bool(conn.execute(_OWN_OUTCOME, {**params, "status": status}).fetchone()[0])


def complete(
    conn: psycopg.Connection, job: Job, *, result_sha256: str, exit_code: int | None, actor: Actor, detail=None
) -> bool:
    """Mark a job finished; False when the attempt is no longer current (the result is discarded).

    True also when this worker's earlier try of the same completion committed
    but its answer was lost, so a retry is never mistaken for a refusal.
    """
    params = {
        "id": job.id,
        "attempt": job.attempt,
        "result_sha256": result_sha256,
        "exit_code": exit_code,
        **_actor(actor, detail),
    }
    return conn.execute(_COMPLETE, params).fetchone() is not None or _already_recorded(conn, params, "finished")


def fail(
    conn: psycopg.Connection,
    job: Job,
    *,
    category: str,
    reason: str,
    exit_code: int | None,
    result_sha256: str | None,
    actor: Actor,
    detail=None,
) -> bool:
    """Mark a job failed by its solver; False when the attempt is no longer current (True on a retry, as complete)."""
    params = {
        "id": job.id,
        "attempt": job.attempt,
        "result_sha256": result_sha256,
        "exit_code": exit_code,
        "category": category,
        "reason": reason,
        **_actor(actor, {"category": category, "reason": reason, **(detail or {})}),
    }
    return conn.execute(_FAIL, params).fetchone() is not None or _already_recorded(conn, params, "failed")


def release(conn: psycopg.Connection, job: Job, *, reason: str, actor: Actor) -> bool:
    """Give a job back to the queue without counting the try (shutdown, broken node)."""
    params = {"id": job.id, "attempt": job.attempt, **_actor(actor, {"reason": reason})}
    return conn.execute(_RELEASE, params).fetchone() is not None


# -------------------------------------------------------------------- rescue

_RESCUE = _with_event(
    "rescued",
    """
    UPDATE inversions j
    SET status = CASE WHEN j.tries >= j.max_attempts THEN 'failed' ELSE 'queued' END,
        failure_category = CASE WHEN j.tries >= j.max_attempts THEN 'lost_worker' END,
        failure_reason = CASE WHEN j.tries >= j.max_attempts
            THEN 'its worker was lost on each of ' || j.tries || ' attempts' END,
        datetime_finished = CASE WHEN j.tries >= j.max_attempts THEN now() END,
        datetime_queued = now(), worker_id = NULL, lease_expires = NULL
    FROM lost WHERE j.id = lost.id
    RETURNING j.id, j.status, j.attempt
""",
    before=f"""
lost AS (
    SELECT j.id FROM inversions j LEFT JOIN workers w ON w.id = j.worker_id
    WHERE j.status = 'running'
      AND (j.lease_expires < now()
           OR (coalesce(w.last_heartbeat < now() - make_interval(secs => %(grace_s)s), true)
               AND pg_postmaster_start_time() < now() - make_interval(secs => %(grace_s)s)
               AND NOT EXISTS (
                   SELECT 1 FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND l.classid = {LOCK_NAMESPACE}::oid AND l.objid::bigint = j.worker_id
                     AND l.objsubid = 2)))
    FOR UPDATE OF j SKIP LOCKED
)
""",
    result="SELECT id, status FROM u",
)


def rescue(conn: psycopg.Connection, actor: Actor, grace_s: float = RESCUE_GRACE_S) -> list[tuple[int, str]]:
    """Return running jobs whose worker is gone to the queue (or fail them), in one statement."""
    params = {"grace_s": grace_s, **_actor(actor, {"reason": "worker lost"})}
    return [tuple(row) for row in conn.execute(_RESCUE, params)]


# ------------------------------------------------------- cancel and requeue

_CANCEL = _with_event(
    "cancelled",
    """
    UPDATE inversions SET status = 'cancelled', datetime_finished = now(), lease_expires = NULL
    WHERE id = ANY(%(ids)s) AND status IN ('registering', 'queued', 'running')
    RETURNING id, status, attempt
""",
    result=f"SELECT id, pg_notify('{CANCEL_CHANNEL}', id::text) FROM u",
)

_REQUEUE = _with_event(
    "requeued",
    """
    UPDATE inversions SET status = 'queued', tries = 0, exit_code = NULL, failure_category = NULL,
        failure_reason = NULL, result_sha256 = NULL, datetime_finished = NULL, datetime_queued = now(),
        worker_id = NULL, lease_expires = NULL
    WHERE id = ANY(%(ids)s) AND status IN ('failed', 'cancelled') AND NOT downloaded
    RETURNING id, status, attempt
""",
)

_FAILED_OF = """
SELECT id FROM inversions
WHERE status = 'failed' AND NOT downloaded AND username = %s AND source_computer = %s
ORDER BY id
"""


def cancel(conn: psycopg.Connection, ids: Sequence[int], actor: Actor) -> list[int]:
    """Cancel jobs not yet ended; running ones are stopped by their worker via NOTIFY (or its next heartbeat)."""
    return [row[0] for row in conn.execute(_CANCEL, {"ids": list(ids), **_actor(actor)})]


def requeue(conn: psycopg.Connection, ids: Sequence[int], actor: Actor) -> list[int]:
    """Send failed or cancelled jobs (not yet retrieved) to the queue again, with fresh tries."""
    return [row[0] for row in conn.execute(_REQUEUE, {"ids": list(ids), **_actor(actor)})]


def failed_of(conn: psycopg.Connection, username: str, source_computer: str) -> list[int]:
    return [row[0] for row in conn.execute(_FAILED_OF, (username, source_computer))]


_SET_PRIORITY = _with_event(
    "priority",
    """
    UPDATE inversions SET priority = %(priority)s
    WHERE id = ANY(%(ids)s) AND status IN ('registering', 'queued', 'running')
    RETURNING id, status, attempt
""",
)


def set_priority(conn: psycopg.Connection, ids: Sequence[int], priority: int, actor: Actor) -> list[int]:
    params = {"ids": list(ids), "priority": priority, **_actor(actor, {"priority": priority})}
    return [row[0] for row in conn.execute(_SET_PRIORITY, params)]


# ----------------------------------------------------------------- retrieval

_MARK_DOWNLOADED = _with_event(
    "downloaded",
    """
    UPDATE inversions SET downloaded = true, datetime_downloaded = now()
    WHERE id = ANY(%(ids)s) AND status IN ('finished', 'failed')
    RETURNING id, status, attempt
""",
)


def mark_downloaded(conn: psycopg.Connection, job_id: int, actor: Actor) -> bool:
    return job_id in mark_downloaded_many(conn, [job_id], actor)


def mark_downloaded_many(conn: psycopg.Connection, job_ids: list[int], actor: Actor) -> set[int]:
    """One statement (one commit) for a whole batch of retrieved jobs; returns the ids it marked."""
    return {row[0] for row in conn.execute(_MARK_DOWNLOADED, {"ids": list(job_ids), **_actor(actor)}).fetchall()}


# ------------------------------------------------------------------- waiting


def listen(conn: psycopg.Connection, *, jobs: bool = True) -> None:
    """LISTEN for cancellations and, unless the worker follows the wake token, for new jobs."""
    if jobs:
        conn.execute(f"LISTEN {CHANNEL}")
    conn.execute(f"LISTEN {CANCEL_CHANNEL}")


# The wake token: among idle workers that claim the same kind of jobs, only the
# holder of this session advisory lock LISTENs for new jobs, so a new job wakes
# one worker instead of every idle one (which all raced for it and all but one
# found nothing).  A holder that has no idle slot left passes it on by unlocking.
WAKE_NAMESPACE = 17235


def take_wake_token(conn: psycopg.Connection, key: int) -> bool:
    """Try to become the worker that is woken for new jobs of this kind; then LISTEN."""
    if not conn.execute("SELECT pg_try_advisory_lock(%s, %s::int)", (WAKE_NAMESPACE, key)).fetchone()[0]:
        return False
    conn.execute(f"LISTEN {CHANNEL}")
    return True


def give_wake_token(conn: psycopg.Connection, key: int) -> None:
    conn.execute(f"UNLISTEN {CHANNEL}")
    conn.execute("SELECT pg_advisory_unlock(%s, %s::int)", (WAKE_NAMESPACE, key))


def count_claimable(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM inversions WHERE status = 'queued'").fetchone()[0]


def count_pending(conn: psycopg.Connection, ids: Sequence[int]) -> int:
    return conn.execute(
        "SELECT count(*) FROM inversions WHERE id = ANY(%s) AND status IN ('registering', 'queued', 'running')",
        (list(ids),),
    ).fetchone()[0]
