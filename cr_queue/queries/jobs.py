"""The life of a job in Python: thin wrappers around the statements of ``jobs.sql``.

Each state change is one short statement that also writes its event row, so
the history can never disagree with the state.  Writes a worker makes about a
job name the attempt it holds (fencing): a write for an attempt that is no
longer current changes nothing and the caller learns it was refused.  What a
worker says about itself (registration, heartbeat, locks, LISTEN) is in
``workers.py``.
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

from cr_queue.job_states import JobStatus
from cr_queue.queries import loader
from cr_queue.queries import workers

SQL = loader.load("jobs")

# A worker whose liveness lock is gone and whose heartbeat is older than this is lost.
RESCUE_GRACE_S = 5.0
# Nobody is lost this soon after the server started: the workers reconnect and renew first.
RESTART_GRACE_S = 15.0


@dataclass(frozen=True)
class Actor:
    """Who is acting: written into every event row (the database adds its role)."""

    os_user: str = field(default_factory=getpass.getuser)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    worker_id: int | None = None


@dataclass
class Job:
    """A row of ``inversions`` as get_jobs and claim return it.

    ``attempt`` (the fencing number, one per claim), ``tries`` (the claims that
    count against ``max_attempts``) and ``max_attempts``: explained at their
    columns in db/schema.py.
    """

    id: int
    status: JobStatus
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

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)

    @property
    def steps(self) -> tuple[str, ...]:
        if self.sim_type == "mod":
            return ("mod",)
        return ("mod", "inv") if self.model_first else ("inv",)


def _actor(actor: Actor, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters every event row takes from the one acting."""
    return {
        "os_user": actor.os_user,
        "host": actor.host,
        "pid": actor.pid,
        "worker_id": actor.worker_id,
        "detail": Jsonb(detail or {}),
    }


# ---------------------------------------------------------------- registration


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
            reused.append((conn.execute(SQL.reuse_registering, params), params))
        pending = []
        for cur, params in reused:
            row = cur.fetchone()
            if row is not None:
                conn.execute(SQL.update_registering, {**params, "id": row[0]})
                pending.append(row[0])
            else:
                pending.append(conn.execute(SQL.insert_registering, params))
        for entry in pending:
            ids.append(entry if isinstance(entry, int) else entry.fetchone()[0])
    return ids


def finish_registration(conn: psycopg.Connection, job_id: int, sha256: str, actor: Actor) -> bool:
    """Make a registered job claimable; False when it was not (or no longer) registering."""
    return job_id in finish_registrations(conn, [(job_id, sha256)], actor)


def finish_registrations(conn: psycopg.Connection, done: list[tuple[int, str]], actor: Actor) -> set[int]:
    """:func:`finish_registration` for many ``(job_id, sha256)`` in one statement; returns the ids made claimable."""
    if not done:
        return set()
    params = {"ids": [job_id for job_id, _ in done], "shas": [sha for _, sha in done], **_actor(actor)}
    return {row[0] for row in conn.execute(SQL.finish_registrations, params).fetchall()}


def find_duplicate(conn: psycopg.Connection, source_computer: str, source_path: str, sha256: str, job_id: int) -> int | None:
    """A job with the same content from the same directory that is still waiting or running."""
    return find_duplicates(conn, source_computer, [(job_id, source_path, sha256)])[job_id]


def find_duplicates(conn: psycopg.Connection, source_computer: str, jobs: list[tuple[int, str, str]]) -> dict[int, int | None]:
    """:func:`find_duplicate` for many ``(job_id, source_path, sha256)`` in one statement: job_id -> duplicate or None."""
    if not jobs:
        return {}
    ids, paths, shas = (list(column) for column in zip(*jobs))
    params = {"source_computer": source_computer, "ids": ids, "paths": paths, "shas": shas}
    return dict(conn.execute(SQL.find_duplicates, params).fetchall())


def drop_registration(conn: psycopg.Connection, job_id: int) -> None:
    """Forget a registration that will not be completed (nobody could ever have claimed it)."""
    conn.execute(SQL.drop_registration, {"id": job_id})


# ------------------------------------------------------------------- reading


def get_jobs(conn: psycopg.Connection, ids: Iterable[int]) -> dict[int, Job]:
    with conn.cursor(row_factory=class_row(Job)) as cur:
        return {job.id: job for job in cur.execute(SQL.get_jobs, {"ids": list(ids)})}


def get_job(conn: psycopg.Connection, job_id: int) -> Job | None:
    return get_jobs(conn, [job_id]).get(job_id)


def events_of(conn: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(SQL.events_of, {"job_id": job_id}).fetchall()


# --------------------------------------------------------------------- claim


def claim(
    conn: psycopg.Connection,
    *,
    actor: Actor,
    can_mod: bool,
    can_inv: bool,
    groups: Sequence[str] = (),
    lease_s: float,
    max_threads: int | None = None,
    avoid: Sequence[int] = (),
) -> Job | None:
    """Take the best queued job this worker can run, in one short transaction (none of ``avoid``)."""
    params = {
        "can_mod": can_mod,
        "can_inv": can_inv,
        "groups": list(groups),
        "lease_s": lease_s,
        "max_threads": max_threads,
        "avoid": list(avoid),
        **_actor(actor),
    }
    with conn.cursor(row_factory=class_row(Job)) as cur:
        return cur.execute(SQL.claim, params).fetchone()


# -------------------------------------------------------------------- leases


def renew(
    conn: psycopg.Connection, worker_id: int, held: Sequence[tuple[int, int]], lease_s: float
) -> set[int]:
    """Extend the leases of the jobs a worker holds (``(job_id, attempt)``); returns the ids still its own.

    The heartbeat itself is workers.beat, sent just before on the same connection: each
    beat writes ``last_heartbeat`` once."""
    if not held:
        return set()
    params = {
        "ids": [job_id for job_id, _ in held],
        "attempts": [attempt for _, attempt in held],
        "worker_id": worker_id,
        "lease_s": lease_s,
    }
    return {row[0] for row in conn.execute(SQL.renew, params)}


# ------------------------------------------------------------------- outcome


def _already_recorded(conn: psycopg.Connection, params: dict[str, Any], status: JobStatus) -> bool:
    """A fenced write whose answer was lost (the connection dropped after the commit) is
    retried; the retry changes nothing, and this tells it the first try went through."""
    return bool(conn.execute(SQL.own_outcome, {**params, "status": status}).fetchone()[0])


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
    return conn.execute(SQL.complete, params).fetchone() is not None or _already_recorded(
        conn, params, JobStatus.FINISHED
    )


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
    return conn.execute(SQL.fail, params).fetchone() is not None or _already_recorded(conn, params, JobStatus.FAILED)


def release(conn: psycopg.Connection, job: Job, *, reason: str, actor: Actor) -> bool:
    """Give a job back to the queue without counting the try (shutdown, broken node)."""
    params = {"id": job.id, "attempt": job.attempt, **_actor(actor, {"reason": reason})}
    return conn.execute(SQL.release, params).fetchone() is not None


# A job given back after node failures on this many distinct nodes (host and scratch directory) fails as node_failures.
MAX_NODE_FAILURE_WORKERS = 3


def release_node_failure(
    conn: psycopg.Connection,
    job: Job,
    *,
    reason: str,
    scratch: str,
    actor: Actor,
    max_nodes: int = MAX_NODE_FAILURE_WORKERS,
) -> JobStatus | None:
    """Give a job back after a node failure (no try burned); once ``max_nodes`` distinct nodes
    (a host and the ``scratch`` directory its worker runs jobs in) have done so it fails as
    ``node_failures``, its reason naming each worker, node and reason, so no single job can
    empty the pool, and no single broken node can fail a job by restarting its worker.
    Returns the job's new status; None when the attempt is no longer current.

    The history is read from the job's events inside crh_release_node_failure (migrations
    0005, 0007), so the cap holds for a worker login too, which may not read events itself."""
    params = {
        "id": job.id,
        "attempt": job.attempt,
        "reason": reason,
        "max_nodes": max_nodes,
        **_actor(actor, {"reason": f"node failure: {reason}", "node_failure": True, "scratch": scratch}),
    }
    row = conn.execute(SQL.release_node_failure, params).fetchone()
    return None if row is None else JobStatus(row[1])


# -------------------------------------------------------------------- rescue


def rescue(
    conn: psycopg.Connection,
    actor: Actor,
    grace_s: float = RESCUE_GRACE_S,
    restart_grace_s: float = RESTART_GRACE_S,
) -> list[tuple[int, str]]:
    """Return running jobs whose worker is gone to the queue (or fail them), in one statement."""
    params = {
        "grace_s": grace_s,
        "restart_grace_s": restart_grace_s,
        "lock_namespace": workers.LOCK_NAMESPACE,
        **_actor(actor, {"reason": "worker lost"}),
    }
    return [tuple(row) for row in conn.execute(SQL.rescue, params)]


# ------------------------------------------------------- cancel and requeue


def cancel(conn: psycopg.Connection, ids: Sequence[int], actor: Actor) -> list[int]:
    """Cancel jobs not yet ended; running ones are stopped by their worker via NOTIFY (or its next heartbeat)."""
    return [row[0] for row in conn.execute(SQL.cancel, {"ids": list(ids), **_actor(actor)})]


def requeue(conn: psycopg.Connection, ids: Sequence[int], actor: Actor) -> list[int]:
    """Send failed or cancelled jobs (not yet retrieved) to the queue again, with all their tries back."""
    return [row[0] for row in conn.execute(SQL.requeue, {"ids": list(ids), **_actor(actor)})]


def failed_of(conn: psycopg.Connection, username: str, source_computer: str) -> list[int]:
    params = {"username": username, "source_computer": source_computer}
    return [row[0] for row in conn.execute(SQL.failed_of, params)]


def set_priority(conn: psycopg.Connection, ids: Sequence[int], priority: int, actor: Actor) -> list[int]:
    params = {"ids": list(ids), "priority": priority, **_actor(actor, {"priority": priority})}
    return [row[0] for row in conn.execute(SQL.set_priority, params)]


# ----------------------------------------------------------------- retrieval


def mark_downloaded(conn: psycopg.Connection, job_id: int, actor: Actor) -> bool:
    return job_id in mark_downloaded_many(conn, [job_id], actor)


def mark_downloaded_many(conn: psycopg.Connection, job_ids: list[int], actor: Actor) -> set[int]:
    """One statement (one commit) for a whole batch of retrieved jobs; returns the ids it marked."""
    return {row[0] for row in conn.execute(SQL.mark_downloaded, {"ids": list(job_ids), **_actor(actor)}).fetchall()}


# ------------------------------------------------------------------ counting


def count_claimable(conn: psycopg.Connection) -> int:
    return conn.execute(SQL.count_claimable).fetchone()[0]


def count_pending(conn: psycopg.Connection, ids: Sequence[int]) -> int:
    return conn.execute(SQL.count_pending, {"ids": list(ids)}).fetchone()[0]


# ------------------------------------------------------------ command locks


def try_locks(conn: psycopg.Connection, keys: Sequence[int]) -> dict[int, str]:
    """Lock ``keys`` (crh_add: one per tomodir, crh_retrieve: one per job) for this session;
    those another session holds, each with that session's application_name ("" where it
    cannot be seen)."""
    busy = [row[0] for row in conn.execute(SQL.try_locks, {"keys": list(keys)})]
    if not busy:
        return {}
    holders = {key: name for key, name in conn.execute(SQL.lock_holders, {"keys": busy})}
    return {key: holders.get(key) or "" for key in busy}


def registering_at(conn: psycopg.Connection, host: str, paths: Sequence[str]) -> dict[str, int]:
    """The 'registering' jobs of these directories of ``host``: path -> job id."""
    return {path: job_id for job_id, path in conn.execute(SQL.registering_at, {"host": host, "paths": list(paths)})}


def jobs_at(conn: psycopg.Connection, host: str, paths: Sequence[str]) -> list[int]:
    """The ids of the jobs registered from these directories of ``host`` or from below them."""
    return [row[0] for row in conn.execute(SQL.jobs_at, {"host": host, "paths": list(paths)})]


def count_orphaned(conn: psycopg.Connection) -> int:
    """Running jobs whose worker holds no liveness lock (dead, or not yet reconnected):
    a --quit-when-empty worker waits for the rescue sweep to return them before it stops."""
    return conn.execute(SQL.count_orphaned, {"lock_namespace": workers.LOCK_NAMESPACE}).fetchone()[0]
