"""What crh_cleanup removes, planned first and then deleted in a few set-based statements.

Four kinds of jobs to delete, one kind of archives to purge, and the archives nobody needs:

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
``retrieved``
    jobs retrieved more than ``keep_retrieved`` ago (``--keep-retrieved``,
    ``[cleanup] keep_retrieved``, default 30 days, 0: at once): their input
    and result archives are purged, their rows and events stay for
    provenance, marked with the time of the purge (``crh show`` says it);
``blobs``
    archives no job refers to.  Those the jobs above release go in the same
    run; any other is taken only once sealed more than an hour ago (the
    grace: an upload is referred to by no job for the moment between its
    seal and its job's registration), and uploads that never completed once
    started more than an hour ago.  ``--dry-run`` shows the grace and what
    it holds back.

:func:`plan` changes nothing (``--dry-run`` shows it).  :func:`apply`
deletes the planned jobs in one statement (their events go with them),
purges the planned retrieved jobs in another, each row checked again
against the rule that chose it, so whatever changed since the plan (a job
retrieved, claimed) is kept.  Then the store's garbage collector deletes
the planned archives: what counts as garbage is one statement
(``garbage`` in queries/blobs.sql) for the plan and the deletion alike, so
what ``--dry-run`` shows is what goes, less any archive a job took up
since.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cr_queue import config, store
from cr_queue.queries import admin as aq
from cr_queue.queries import jobs as jq
from cr_queue.status import jsonable
from cr_queue.tomodir import control

KINDS = ("stuck_registering", "expired", "crh_missing", "retrieved", "blobs")
DELETING = ("stuck_registering", "expired", "crh_missing")
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_KEEP_RETRIEVED_S = config.DEFAULT_KEEP_RETRIEVED_S
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
    keep_retrieved_s: float = DEFAULT_KEEP_RETRIEVED_S


@dataclass
class Plan:
    options: CleanupOptions
    jobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> jobs to delete
    purge: list[dict[str, Any]] = field(default_factory=list)  # retrieved jobs whose archives go
    blobs: list[dict[str, Any]] = field(default_factory=list)
    held_back: list[dict[str, Any]] = field(default_factory=list)  # unreferenced, but within the grace
    expiring: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    store_size: dict[str, int] = field(default_factory=dict)

    @property
    def job_ids(self) -> list[tuple[int, str]]:
        return [(job["id"], kind) for kind, jobs in self.jobs.items() for job in jobs]

    @property
    def doomed(self) -> list[int]:
        """The jobs whose references to archives end in this run: deleted, or purged."""
        return sorted({job_id for job_id, _ in self.job_ids} | {job["id"] for job in self.purge})

    @property
    def n_jobs(self) -> int:
        return sum(len(jobs) for jobs in self.jobs.values())

    @property
    def blob_bytes(self) -> int:
        return sum(b["bytes"] for b in self.blobs)

    @property
    def empty(self) -> bool:
        return self.n_jobs == 0 and not self.purge and not self.blobs

    def as_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "retention_days": self.options.retention_days,
                "keep_retrieved_s": self.options.keep_retrieved_s,
                "grace_s": self.options.blob_grace_s,
                "host": self.options.host,
                "kinds": list(self.options.kinds),
                "jobs": {kind: self.jobs.get(kind, []) for kind in DELETING},
                "purge": self.purge,
                "blobs": self.blobs,
                "bytes": self.blob_bytes,
                "held_back": self.held_back,
                "expiring": self.expiring,
                "problems": self.problems,
                "store_size": self.store_size,
            }
        )


@dataclass
class Result:
    deleted_jobs: list[int] = field(default_factory=list)
    kept_jobs: list[int] = field(default_factory=list)  # planned, but changed since the plan
    purged_jobs: list[int] = field(default_factory=list)  # retrieved jobs whose archives were purged
    deleted_blobs: list[int] = field(default_factory=list)
    kept_blobs: list[int] = field(default_factory=list)
    bytes_freed: int = 0
    files_removed: int = 0  # archive files removed from a shared-directory store
    store_size_before: dict[str, int] = field(default_factory=dict)
    store_size_after: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


def plan(conn: psycopg.Connection, options: CleanupOptions = CleanupOptions(), where: store.Store = store.DATABASE) -> Plan:
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
    if "retrieved" in options.kinds:
        result.purge = aq.retrieved_to_purge(conn, options.keep_retrieved_s)
    released = _released(result.jobs.values(), result.purge)
    garbage = store.collect_garbage(
        conn, where, dry_run=True, doomed=result.doomed, released=sorted(released),
        min_age_s=options.blob_grace_s, stale_upload_s=options.blob_grace_s,
    )
    # Without the blobs kind only the archives this run's jobs release go (with their jobs).
    chosen = [r for r in garbage.rows if "blobs" in options.kinds or r.sha256 in released]
    result.blobs = [_blob(r) for r in chosen]
    if "blobs" in options.kinds:
        # What the grace holds back: the same definition without it, less what goes now.
        going = {r.id for r in chosen}
        unreferenced = store.collect_garbage(
            conn, where, dry_run=True, doomed=result.doomed, released=sorted(released), min_age_s=0, stale_upload_s=0,
        )
        result.held_back = [_blob(r) for r in unreferenced.rows if r.id not in going]
    result.store_size = aq.store_size(conn)
    return result


def _released(deleted: Any, purged: list[dict[str, Any]]) -> set[str]:
    """The hashes of the archives the doomed jobs refer to."""
    rows = [job for jobs in deleted for job in jobs] + purged
    return {sha for job in rows for sha in (job.get("input_sha256"), job.get("result_sha256")) if sha}


def _blob(row: store.Garbage) -> dict[str, Any]:
    return {"id": row.id, "sha256": row.sha256, "complete": row.complete, "created": row.created, "bytes": row.bytes}


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
    """Delete and purge what ``planned`` lists and is still due; report what was freed
    (``where``: the installation's store, whose directory, if it is one, is swept too).

    Archives: exactly the planned ones that the one definition of garbage
    still chooses once the jobs are gone, never any other."""
    options = planned.options
    result = Result(store_size_before=aq.store_size(conn))
    # A .crh restored while the user read the plan saves its job: look once more.
    still_gone = {job["id"] for job in _crh_missing(planned.jobs.get("crh_missing", []))[0]}
    wanted, restored = [], []
    for job_id, kind in planned.job_ids:
        (wanted if kind != "crh_missing" or job_id in still_gone else restored).append((job_id, kind))
    result.kept_jobs = sorted(job_id for job_id, _ in restored)
    released: set[str] = set()
    with conn.transaction():
        if wanted:
            deleted = aq.delete_jobs(
                conn, wanted, host=options.host, retention_days=options.retention_days, stuck_s=options.stuck_s
            )
            result.deleted_jobs = sorted(row["id"] for row in deleted)
            result.kept_jobs = sorted(set(result.kept_jobs) | {j for j, _ in wanted} - set(result.deleted_jobs))
            released |= _released([deleted], [])
        if planned.purge:
            purged = aq.purge_archives(conn, [job["id"] for job in planned.purge], options.keep_retrieved_s, jq.Actor())
            result.purged_jobs = sorted(row["id"] for row in purged)
            result.kept_jobs = sorted(set(result.kept_jobs) | {job["id"] for job in planned.purge} - set(result.purged_jobs))
            released |= _released([], purged)
    if planned.blobs:
        ids = [b["id"] for b in planned.blobs]
        try:
            report = store.collect_garbage(
                conn, where, ids=ids, released=sorted(released),
                min_age_s=options.blob_grace_s, stale_upload_s=options.blob_grace_s,
            )
        except store.StoreUnavailable as exc:
            result.problems.append(f"archives were not all deleted: {exc}; run crh_cleanup again")
        else:
            result.bytes_freed = report.bytes
            result.files_removed = report.files
            result.problems.extend(report.errors)
            result.deleted_blobs = sorted(r.id for r in report.rows)
        result.kept_blobs = sorted(set(ids) - set(result.deleted_blobs))
    result.store_size_after = aq.store_size(conn)
    return result
