"""What a worker says about itself: thin wrappers around the statements of ``workers.sql``.

A live worker holds a session advisory lock on its own id (on its control
connection, the only one an idle worker has) and beats every few seconds.  When the worker dies its
connection drops, the lock vanishes, its heartbeat stops, and the next rescue
sweep (``jobs.rescue``) returns its jobs to the queue within seconds, long
before their leases run out.  Requiring both signals keeps a short network
blip or a database restart (which drops every lock at once) from taking jobs
away from workers that are still alive and will reconnect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from cr_queue.queries import loader

SQL = loader.load("workers")

# First key of the two-key advisory locks of live workers (the second is the worker id).
LOCK_NAMESPACE = 17234
# First key of the wake tokens (the second is the kind of jobs a worker claims).
WAKE_NAMESPACE = 17235
# First key of the rescue leader lock (the second is 0): its holder sweeps for the whole fleet.
LEADER_NAMESPACE = 17236
# The channels of workers.sql's LISTEN statements, to tell their notifications apart.
CHANNEL = "crh_jobs"
CANCEL_CHANNEL = "crh_cancel"
CONTROL_CHANNEL = "crh_worker_control"


@dataclass(frozen=True)
class Orders:
    """What the database tells a worker at each beat: an admin's request and its node's settings."""

    requested: str | None = None
    nice: int | None = None
    cpus: int | None = None
    threads: int | None = None
    active: bool = True


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
    return conn.execute(SQL.register_worker, params).fetchone()[0]


@dataclass(frozen=True)
class Beat:
    """What one beat brought back: the orders, the held jobs still the worker's (None when
    nothing was renewed) and whether it took the rescue leader lock (None when it did not try)."""

    orders: Orders
    kept: set[int] | None = None
    leader: bool | None = None


def beat(
    conn: psycopg.Connection,
    worker_id: int,
    *,
    draining: bool,
    held: Sequence[tuple[int, int]] = (),
    lease_s: float = 0.0,
    lead: bool = False,
) -> Beat:
    """The heartbeat, in one statement: brings the orders, renews the leases of ``held``
    ((job id, attempt) pairs; skipped when empty) and, with ``lead``, tries the leader lock."""
    params = {
        "id": worker_id,
        "draining": draining,
        "renew": bool(held),
        "ids": [job_id for job_id, _ in held],
        "attempts": [attempt for _, attempt in held],
        "lease_s": lease_s,
        "lead": lead,
        "leader_namespace": LEADER_NAMESPACE,
    }
    row = conn.execute(SQL.beat, params).fetchone()
    if row is None:
        return Beat(Orders(), set() if held else None, None)
    requested, nice, cpus, threads, active, kept, leader = row
    orders = Orders(requested, nice, cpus, threads, True if active is None else active)
    return Beat(orders, None if kept is None else set(kept), leader)


def rescue_leader(conn: psycopg.Connection) -> tuple[int, str] | None:
    """The session holding the rescue leader lock: (backend pid, application_name), or None."""
    row = conn.execute(SQL.rescue_leader, {"leader_namespace": LEADER_NAMESPACE}).fetchone()
    return None if row is None else (row[0], row[1])


def stop_worker(conn: psycopg.Connection, worker_id: int, reason: str) -> None:
    conn.execute(SQL.stop_worker, {"id": worker_id, "reason": reason})


def hold_worker_lock(conn: psycopg.Connection, worker_id: int) -> bool:
    """Take the lock that says "this worker is alive" for as long as ``conn`` lives."""
    params = {"lock_namespace": LOCK_NAMESPACE, "worker_id": worker_id}
    return bool(conn.execute(SQL.hold_worker_lock, params).fetchone()[0])


def listen(conn: psycopg.Connection, *, jobs: bool = True) -> None:
    """LISTEN for cancellations, an admin's requests and, unless the worker follows the wake token, new jobs."""
    if jobs:
        conn.execute(SQL.listen_jobs)
    conn.execute(SQL.listen_cancel)
    conn.execute(SQL.listen_control)


# The wake token: among idle workers that claim the same kind of jobs, only the
# holder of this session advisory lock LISTENs for new jobs, so a new job wakes
# one worker instead of every idle one (which all raced for it and all but one
# found nothing).  A holder that has no idle slot left passes it on by unlocking.


def take_wake_token(conn: psycopg.Connection, key: int) -> bool:
    """Try to become the worker that is woken for new jobs of this kind; then LISTEN."""
    if not conn.execute(SQL.take_wake_token, {"wake_namespace": WAKE_NAMESPACE, "key": key}).fetchone()[0]:
        return False
    conn.execute(SQL.listen_jobs)
    return True


def give_wake_token(conn: psycopg.Connection, key: int) -> None:
    conn.execute(SQL.unlisten_jobs)
    conn.execute(SQL.give_wake_token, {"wake_namespace": WAKE_NAMESPACE, "key": key})
