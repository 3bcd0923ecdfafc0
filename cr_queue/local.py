"""Local mode: add, run the jobs on this machine, retrieve — one command (cr_hydra's --with-local_inv).

The jobs go into a fresh private group, so remote workers never take them
and the local worker takes nothing else; it quits when that group is done.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cr_queue import add, config, retrieve
from cr_queue import worker
from cr_queue.db.connection import Database
from cr_queue.job_states import JobStatus
from cr_queue.queries import roles
from cr_queue.solvers import solvers
from cr_queue.tomodir import archive


@dataclass
class LocalRun:
    group: str
    added: add.AddReport
    worker: worker.Worker
    retrieved: retrieve.RetrieveReport


@dataclass(frozen=True)
class JobEnded:
    """A job of this run ended on the local worker (the progress a command shows)."""

    job_id: int
    status: JobStatus  # FINISHED or FAILED
    message: str  # the worker's line for it
    done: int  # jobs of this run ended so far, this one included
    total: int  # jobs this run added


def configured_solvers(settings: config.Settings) -> dict[str, solvers.Solver]:
    """The solvers crh_add --local runs: the options, environment or config; else CRTomo/CRMod on PATH."""
    return solvers.resolve(
        {
            "crtomo": (settings.crtomo, "--crtomo, CRH_CRTOMO or [solvers] crtomo"),
            "crmod": (settings.crmod, "--crmod, CRH_CRMOD or [solvers] crmod"),
        }
    )


def default_jobs(threads: int) -> int:
    """Jobs at once when none is asked for: as many as the CPUs hold at ``threads`` each."""
    return max(1, (os.cpu_count() or 1) // threads)


def run_local(
    db: Database,
    paths: Iterable[Path],
    options: add.AddOptions,
    solver_map: dict[str, solvers.Solver],
    *,
    limits: archive.Limits,
    jobs: int | None = None,
    threads: int = 1,
    found=None,
    on_added: Callable[[add.Added], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    on_job_end: Callable[[JobEnded], None] | None = None,
    on_retrieved: Callable[[retrieve.Item], None] | None = None,
) -> LocalRun:
    """Add the tomodirs below ``paths`` to a private group, run them here, retrieve them.

    ``limits``: the caps on unpacking (config.archive_limits); ``jobs``: at once
    (default :func:`default_jobs`); ``on_event``: every line of the worker's
    log; ``on_job_end``: each job of this run that ended, counted."""
    paths = [Path(p) for p in paths]
    check_may_run_a_worker(db)
    group = f"local-{uuid.uuid4().hex[:12]}"
    options = add.AddOptions(**{**options.__dict__, "group": group})
    added = add.add(db, paths, options, progress=on_added, found=found)
    ended = _Counter(len(added.added), on_job_end)
    w = worker.Worker(
        db,
        solver_map,
        worker.WorkerOptions(
            jobs=jobs or default_jobs(threads), threads=threads, quit_when_empty=True, groups=(group,), name=group
        ),
        limits=limits,
        on_event=on_event,
        on_job_end=ended,
    )
    # Interrupted (Ctrl-C) while registering: nothing is run; the report says what a rerun resumes.
    go = bool(added.added) and not added.interrupted
    if go:
        w.run()
    got = (
        # In this process only: the worker's threads ran here (see retrieve_helper.wanted).
        retrieve.retrieve(db, [a.path for a in added.added], limits=limits, progress=on_retrieved, processes=1)
        if go
        else retrieve.RetrieveReport()
    )
    return LocalRun(group, added, w, got)


class WorkerNotAllowed(config.ConfigError):
    """This database login may add jobs but not run the worker --local needs."""


def check_may_run_a_worker(db: Database) -> None:
    """Refuse --local before anything is registered when the login may not run a worker:
    a user login (``crh db grant-user``) may add and retrieve jobs, but only a worker
    login may register a worker and claim them, so the jobs would wait for ever."""
    conn = db.connect("crh_add")
    try:
        may = roles.access(conn)
        login = conn.info.user
    finally:
        conn.close()
    if may not in ("admin", "worker"):
        raise WorkerNotAllowed(
            f"crh_add --local runs a worker on this machine, which the database login {login} may not "
            f"(it is a {may} login: it may add and retrieve jobs, not claim them). Nothing was registered. "
            f"Run crh_add without --local and let the pool's workers run the jobs, or ask the admin for "
            f"`crh db grant-worker {login}` as well."
        )


class _Counter:
    """The worker's ``on_job_end``, numbering the jobs as they end (the worker's slots are threads)."""

    def __init__(self, total: int, report: Callable[[JobEnded], None] | None) -> None:
        self._total = total
        self._report = report
        self._done = 0
        self._lock = threading.Lock()

    def __call__(self, job_id: int, status: JobStatus, message: str) -> None:
        if self._report is None:
            return
        with self._lock:
            self._done += 1
            event = JobEnded(job_id, status, message, self._done, self._total)
        self._report(event)
