"""What crh_cleanup removes, planned first and then deleted in a few set-based statements.

Four kinds of garbage:

``stuck_registering``
    jobs left in 'registering' for more than an hour by an interrupted crh_add;
``expired``
    finished, failed or cancelled jobs nobody retrieved within the retention
    period (default 30 days); those due within the next week are announced;
``crh_missing``
    jobs from *this* computer, not yet retrieved and not running, whose
    ``.crh`` file is gone (or now names another job): nobody can retrieve
    them any more.  Only files whose absence is certain count; a file that
    cannot be checked (permissions) keeps its job and is reported;
``blobs``
    archives no remaining job refers to, and uploads that never completed,
    both older than an hour.

:func:`plan` changes nothing (``--dry-run`` shows it).  :func:`apply`
deletes the planned jobs in one statement (their events go with them) and
then the planned archives in another, each row checked again against the
rule that chose it, so whatever changed since the plan (a job retrieved,
an archive taken up by a new job) is kept.  Archives are deleted by the
store's garbage collector (``store.collect_garbage``: rows, chunks, and the
files of a shared-directory store), which deletes an archive only while no
job refers to it; the database's foreign keys would refuse anything else.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cr_queue.queries import admin as aq
from cr_queue.tomodir import control
from cr_queue import store
from cr_queue.status import jsonable

KINDS = ("stuck_registering", "expired", "crh_missing", "blobs")
DEFAULT_RETENTION_DAYS = 30.0
STUCK_S = 3600.0
BLOB_GRACE_S = 3600.0
WARN_DAYS = 7


class CleanupError(Exception):
    """Cleanup could not finish; the message says what happened and what to do."""


@dataclass(frozen=True)
class CleanupOptions:
    retention_days: float = DEFAULT_RETENTION_DAYS
    kinds: tuple[str, ...] = KINDS
    host: str = field(default_factory=socket.gethostname)
    stuck_s: float = STUCK_S
    blob_grace_s: float = BLOB_GRACE_S


@dataclass
class Plan:
    options: CleanupOptions
    jobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> jobs
    blobs: list[dict[str, Any]] = field(default_factory=list)
    expiring: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    store_size: dict[str, int] = field(default_factory=dict)

    @property
    def job_ids(self) -> list[tuple[int, str]]:
        return [(job["id"], kind) for kind, jobs in self.jobs.items() for job in jobs]

    @property
    def n_jobs(self) -> int:
        return sum(len(jobs) for jobs in self.jobs.values())

    @property
    def blob_bytes(self) -> int:
        return sum(b["bytes"] for b in self.blobs)

    @property
    def empty(self) -> bool:
        return self.n_jobs == 0 and not self.blobs

    def as_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "retention_days": self.options.retention_days,
                "host": self.options.host,
                "kinds": list(self.options.kinds),
                "jobs": {kind: self.jobs.get(kind, []) for kind in KINDS if kind != "blobs"},
                "blobs": self.blobs,
                "bytes": self.blob_bytes,
                "expiring": self.expiring,
                "problems": self.problems,
                "store_size": self.store_size,
            }
        )


@dataclass
class Result:
    deleted_jobs: list[int] = field(default_factory=list)
    kept_jobs: list[int] = field(default_factory=list)  # planned, but changed since the plan
    deleted_blobs: list[int] = field(default_factory=list)
    kept_blobs: list[int] = field(default_factory=list)
    bytes_freed: int = 0
    files_removed: int = 0  # archive files removed from a shared-directory store
    store_size_before: dict[str, int] = field(default_factory=dict)
    store_size_after: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


def plan(conn: psycopg.Connection, options: CleanupOptions = CleanupOptions()) -> Plan:
    """What a cleanup would delete now; changes nothing.

    Only an admin sees every job: under row security anyone else would take
    the archives of jobs they cannot see for orphans.
    """
    if not aq.is_admin(conn):
        raise CleanupError(
            f"crh_cleanup needs to see every job, and the database role {conn.info.user} sees only its own: "
            "run it as the database owner or as a login that is a member of crh_admin (GRANT crh_admin TO NAME)"
        )
    result = Plan(options)
    taken: set[int] = set()

    def keep(kind: str, rows: list[dict[str, Any]]) -> None:
        fresh = [r for r in rows if r["id"] not in taken]
        taken.update(r["id"] for r in fresh)
        result.jobs[kind] = fresh

    if "stuck_registering" in options.kinds:
        keep("stuck_registering", aq.stuck_registering(conn, options.stuck_s))
    if "expired" in options.kinds:
        keep("expired", aq.expired(conn, options.retention_days))
        result.expiring = aq.expiring(conn, options.retention_days)
    if "crh_missing" in options.kinds:
        gone, problems = _crh_missing(aq.crh_candidates(conn, options.host))
        keep("crh_missing", gone)
        result.problems.extend(problems)
    if "blobs" in options.kinds:
        result.blobs = aq.orphan_blobs(conn, sorted(taken), options.blob_grace_s)
    result.store_size = aq.store_size(conn)
    return result


def _crh_missing(candidates: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The candidates whose .crh is certainly gone or now names another job."""
    gone: list[dict[str, Any]] = []
    problems: list[str] = []
    for job in candidates:
        path = job["crh_file"]
        try:
            os.lstat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                gone.append({**job, "why": f"{path} does not exist"})
            else:
                problems.append(
                    f"job {job['id']}: cannot check {path} ({exc.strerror}); kept. "
                    "Run crh_cleanup as the user who added it to check it"
                )
            continue
        try:
            names = control.read(path).job_id
        except control.ControlFileError as exc:
            problems.append(f"job {job['id']}: {exc}; kept")
            continue
        if names != job["id"]:
            gone.append({**job, "why": f"{path} now names job {names}"})
    return gone, problems


def apply(conn: psycopg.Connection, planned: Plan, where: store.Store) -> Result:
    """Delete what ``planned`` lists and is still garbage; report what was freed
    (``where``: the installation's store, whose directory, if it is one, is swept too)."""
    options = planned.options
    result = Result(store_size_before=aq.store_size(conn))
    # A .crh restored while the user read the plan saves its job: look once more.
    still_gone = {job["id"] for job in _crh_missing(planned.jobs.get("crh_missing", []))[0]}
    wanted, restored = [], []
    for job_id, kind in planned.job_ids:
        (wanted if kind != "crh_missing" or job_id in still_gone else restored).append((job_id, kind))
    result.kept_jobs = sorted(job_id for job_id, _ in restored)
    if wanted:
        with conn.transaction():
            deleted = set(
                aq.delete_jobs(
                    conn,
                    wanted,
                    host=options.host,
                    retention_days=options.retention_days,
                    stuck_s=options.stuck_s,
                )
            )
        result.deleted_jobs = sorted(deleted)
        result.kept_jobs = sorted(set(result.kept_jobs) | {job_id for job_id, _ in wanted if job_id not in deleted})
    if planned.blobs:
        # The store's own garbage collector deletes the rows (chunks go with them) and, for a
        # shared-directory store, the files; it checks every archive again against the jobs
        # that remain, so one a job took up since the plan is kept.
        ids = [b["id"] for b in planned.blobs]
        try:
            report = store.collect_garbage(
                conn,
                where,
                min_age_s=options.blob_grace_s,
                stale_upload_s=options.blob_grace_s,
                batch=max(1000, 2 * len(ids)),
            )
        except (store.StoreUnavailable, psycopg.errors.ForeignKeyViolation) as exc:
            result.problems.append(f"archives were not all deleted: {exc}; run crh_cleanup again")
        else:
            result.bytes_freed = report.bytes
            result.files_removed = report.files
            result.problems.extend(report.errors)
        remaining = set(aq.existing_blobs(conn, ids))
        result.deleted_blobs = sorted(set(ids) - remaining)
        result.kept_blobs = sorted(remaining)
    result.store_size_after = aq.store_size(conn)
    return result
