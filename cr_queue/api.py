"""The Python API: the same queue from a script or a notebook, on the embedded or a remote database.

    from cr_queue.api import Queue

    with Queue.open() as q:                       # or Queue.open("postgresql://...")
        ids = q.submit("/data/site/td_01")         # a tomodir on disk (writes td_01.crh, like crh_add)
        job = q.submit_files({                     # or a tomodir held in memory
            "exe/crtomo.cfg": cfg_text, "grid/elem.dat": elem, ...})
        q.wait(ids + [job])
        q.fetch(job, "/tmp/result")                # results of an in-memory job
        q.retrieve("/data/site")                   # results of on-disk jobs, like crh_retrieve

The command-line tools are thin layers over the same services.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cr_queue import add, config, registration, retrieve
from cr_queue.tomodir import archive
from cr_queue.tomodir import discover
from cr_queue.job_states import ENDED, RETRIEVABLE, JobStatus
from cr_queue.queries import jobs
from cr_queue import store
from cr_queue.database import open_database
from cr_queue.db.connection import Database

# What an in-memory tomodir is made of on disk, for the upload: a tomodir's directories and its grid.
TOMODIR_SUBDIRS = (*discover.TOMODIR_SUBDIRS, "grid")


class JobError(Exception):
    """A job could not be submitted or fetched; the message says which and why."""


@dataclass(frozen=True)
class JobInfo:
    """A job as a script sees it: its row at the moment it was asked for."""

    id: int
    status: str
    sim_type: str
    source_path: str
    attempt: int
    failure_reason: str | None
    downloaded: bool


class Queue:
    """A handle on the queue; cheap to open, holds one connection."""

    def __init__(self, database: Database, *, limits: archive.Limits) -> None:
        self.database = database
        self._limits = limits  # the caps on unpacking a result (config.archive_limits)
        self._conn = database.connect("cr_queue api")
        self._actor = jobs.Actor()

    @classmethod
    def open(cls, db: str | None = None) -> Queue:
        """Open the queue the commands would use (``db`` overrides, as ``--db`` does)."""
        settings = config.load(db=db)
        return cls(open_database(settings), limits=config.archive_limits(settings))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------- submitting

    def submit(
        self, *paths: str | Path, priority: int = 0, group: str | None = None, threads: int = 1,
        timeout_s: int | None = None, force: bool = False,
    ) -> list[int]:
        """Queue every tomodir below the paths, exactly as crh_add does; returns the job ids."""
        options = add.AddOptions(force=force, priority=priority, group=group, threads=threads, timeout_s=timeout_s)
        report = add.add(self.database, [Path(p) for p in paths], options)
        if report.problems and not report.added:
            raise JobError("; ".join(report.problems))
        return [a.job_id for a in report.added]

    def submit_files(
        self, files: Mapping[str, bytes | str], *, priority: int = 0, group: str | None = None,
        threads: int = 1, timeout_s: int | None = None,
    ) -> int:
        """Queue a tomodir given as {relative path: content}; nothing is left on disk.

        Fetch its results with :meth:`fetch` (there is no .crh to retrieve by).
        """
        with tempfile.TemporaryDirectory(prefix="crh-api-") as tmp:
            root = Path(tmp) / "tomodir"
            for sub in TOMODIR_SUBDIRS:
                (root / sub).mkdir(parents=True, exist_ok=True)
            for rel, content in files.items():
                target = (root / rel).resolve()
                if root.resolve() not in target.parents:
                    raise JobError(f"{rel}: not a path inside the tomodir; give paths like 'exe/crtomo.cfg'")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content.encode() if isinstance(content, str) else content)
            state = discover.classify(root)
            if isinstance(state, discover.Incomplete):
                raise JobError(f"the tomodir given in memory lacks {', '.join(state.missing)}")
            if not isinstance(state, discover.Tomodir):
                raise JobError("the tomodir given in memory needs no modelling or inversion")
            options = add.AddOptions(priority=priority, group=group, threads=threads, timeout_s=timeout_s)
            return registration.register_unlinked(self._conn, self.database.store, state, options, self._actor).job_id

    # ------------------------------------------------------------ watching

    def jobs(self, ids: Sequence[int]) -> list[JobInfo]:
        found = jobs.get_jobs(self._conn, ids)
        return [
            JobInfo(j.id, j.status, j.sim_type, j.source_path, j.attempt, j.failure_reason, j.downloaded)
            for j in (found[i] for i in ids if i in found)
        ]

    def status(self, job_id: int) -> str:
        job = jobs.get_job(self._conn, job_id)
        if job is None:
            raise JobError(f"job {job_id} is not in the database {self.database.redacted}")
        return job.status

    def wait(self, ids: Iterable[int], *, timeout: float | None = None, poll: float = 1.0) -> dict[int, str]:
        """Block until every job has ended (finished, failed or cancelled); returns their states."""
        ids = list(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            states = {j.id: j.status for j in self.jobs(ids)}
            missing = [i for i in ids if i not in states]
            if missing:
                raise JobError(f"jobs {missing} are not in the database {self.database.redacted}")
            if all(s in ENDED for s in states.values()):
                return states
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still pending after {timeout} s: {[i for i, s in states.items() if s not in ENDED]}")
            time.sleep(poll)

    def cancel(self, ids: Iterable[int]) -> list[int]:
        return jobs.cancel(self._conn, list(ids), self._actor)

    # ------------------------------------------------------------- results

    def fetch(self, job_id: int, dest: str | Path) -> Path:
        """Unpack a finished (or failed) job's results into ``dest``; returns ``dest``.

        For a failed job that is exe/error.dat and the solver log; JobError
        says why it failed after they are written.
        """
        job = jobs.get_job(self._conn, job_id)
        if job is None:
            raise JobError(f"job {job_id} is not in the database {self.database.redacted}")
        if job.status not in RETRIEVABLE:
            raise JobError(f"job {job_id} is {job.status}; wait for it first")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if job.result_sha256:
            with tempfile.TemporaryFile() as packed:
                store.fetch(self._conn, self.database.store, job.result_sha256, packed)
                packed.seek(0)
                archive.unpack(packed, dest, limits=self._limits)
        jobs.mark_downloaded(self._conn, job_id, self._actor)
        if job.status == JobStatus.FAILED:
            raise JobError(f"job {job_id} failed ({job.failure_category}): {job.failure_reason}")
        return dest

    def retrieve(self, *paths: str | Path) -> retrieve.RetrieveReport:
        """Bring results into the tree below the paths, exactly as crh_retrieve does."""
        return retrieve.retrieve(self.database, [Path(p) for p in paths], limits=self._limits)

