"""The job pipeline: fetch and unpack the input, run the solver steps, judge, upload, record.

Every write about the job is fenced by its attempt and rides out a database
outage (``_persist``): the result waits on the node until the database can
say whether the attempt is still this worker's.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psycopg

from cr_queue.tomodir import archive
from cr_queue.job_states import JobStatus
from cr_queue.queries import jobs
from cr_queue.solvers import solvers
from cr_queue import store
from cr_queue.util.spool import Spool
from cr_queue.worker.reconnect import CONNECTION_ERRORS, Backoff, first_line as _first_line
from cr_queue.worker.options import (
    CANNOT_EXECUTE, FAILURE_MEMBERS, INPUT_SPOOL_BYTES, LOG_NAME, TMP_PREFIX, NodeFailure, Running,
)
from cr_queue.worker.scratch import ran_out_of_space, scratch_full


T = TypeVar("T")


class PipelineMixin:
    """The job-pipeline part of Worker (its state lives in Worker.__init__)."""

    def _process(self, conn: psycopg.Connection, running: Running) -> None:
        job = running.job
        self.on_event(f"job {job.id}: started attempt {job.attempt} ({'+'.join(job.steps)}) from {job.source_path}")
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-job{job.id}-", dir=self.workdir))
        try:
            tomodir = tmp / "tomodir"
            try:
                self._unpack_input(conn, job, tmp, tomodir)
            except (archive.ArchiveError, store.BlobMissing) as exc:
                self._report_failure(conn, running, "input_archive", f"the input archive cannot be used: {exc}", None, None)
                return
            except OSError as exc:
                raise NodeFailure(f"cannot unpack the input in {tmp}: {exc}", space=_no_space(exc)) from exc
            # No connection is held while the solver runs (hours, maybe): the fleet's
            # connections are its idle workers plus the transfers in progress.
            conn.close()
            solvers.prepare(tomodir)
            before = archive.snapshot(tomodir)
            verdict = self._run_solvers(job, tomodir, running)
            if self._stopped_early(conn, running):
                return
            if verdict.ok:
                members = archive.changed_since(tomodir, before)
                ok = self._persist(
                    conn,
                    running,
                    self._uploaded(
                        tomodir,
                        members,
                        lambda c, result_sha: jobs.complete(
                            c,
                            job,
                            result_sha256=result_sha,
                            exit_code=verdict.exit_code,
                            actor=self.actor,
                            detail=self._provenance(running, tomodir),
                        ),
                    ),
                )
                if ok:
                    self.tally.finished += 1
                    files = sum(1 for m in members if (tomodir / m).is_file())
                    self._ended(job, JobStatus.FINISHED, f"job {job.id}: finished ({files} result files)")
                else:
                    self._refused(job, by_database=ok is False)
                return
            members = [m for m in FAILURE_MEMBERS if (tomodir / m).exists()]
            self._report_failure(
                conn, running, verdict.category, verdict.reason, verdict.exit_code, None, tomodir, members
            )
        except NodeFailure as exc:
            if exc.space:
                # Removed here and now: whether this node is broken depends on the room left without it.
                exc.room_again = self._remove_now(tmp)
            raise
        finally:
            self._discard(tmp)

    def _stopped_early(self, conn: psycopg.Connection | None, running: Running) -> bool:
        job = running.job
        if running.why in ("lost", "stale"):
            self._refused(job, by_database=False)
            return True
        if running.why == "cancelled":
            self.tally.cancelled += 1
            self.on_event(f"job {job.id}: solver stopped, job cancelled")
            return True
        if running.why == "release":
            if self._persist(conn, running, lambda c: jobs.release(c, job, reason=self.stop_reason, actor=self.actor)):
                self.tally.released += 1
                self.on_event(f"job {job.id}: given back to the queue")
            return True
        return False

    def _refused(self, job: jobs.Job, *, by_database: bool) -> None:
        """Count a result that will never be used; the log says whether the fence or the worker decided."""
        self.tally.refused += 1
        if by_database:
            self.on_event(
                f"job {job.id}: the database refused the result of attempt {job.attempt}, "
                "which is no longer current; its result was discarded"
            )
        else:
            self.on_event(f"job {job.id}: attempt {job.attempt} is no longer this worker's; its result was discarded")

    def _persist(self, conn: psycopg.Connection | None, running: Running, fn: Callable[[psycopg.Connection], T]) -> T | None:
        """Run a fenced write, riding out a database outage of any length.

        The write names the attempt, so retrying after a reconnect can never
        complete a job twice, and the database decides whether the attempt is
        still ours: the result waits on the node until it can ask.  Only the
        database saying the attempt is gone ("lost", from the heartbeat) or a
        worker told to give everything up now ends the wait.  When the slot's
        connection is closed (it is, once the solver started) one is opened for
        the write and closed after it.
        """
        backoff = Backoff()
        own: psycopg.Connection | None = None
        try:
            while True:
                current = conn if conn is not None and not conn.closed else own
                try:
                    if current is None or current.closed:
                        current = own = self._connect("transfer")
                    return fn(current)
                except CONNECTION_ERRORS as exc:
                    if current is not None:
                        current.close()
                    if running.why == "lost":
                        return None
                    if self._aborting.is_set():
                        self._not_given_back.add(running.job.id)
                        self.on_event(
                            f"job {running.job.id}: not given back, the database did not answer "
                            f"({_first_line(exc)}); its lease brings it back to the queue"
                        )
                        return None
                    self.on_event(
                        f"job {running.job.id}: database unreachable ({_first_line(exc)}); retrying in {backoff.step:g} s"
                    )
                    backoff.wait(self._aborting)
        finally:
            if own is not None:
                own.close()

    def _uploaded(
        self, tomodir: Path, members: list[str], write: Callable[[psycopg.Connection, str | None], T]
    ) -> Callable[[psycopg.Connection], T]:
        """A write for _persist that first uploads ``members`` (none: no result) and names the archive.

        Upload and write are retried together: the upload commits without waiting
        for the disk (blobs.sql ``begin``), so a server that crashes between the two
        may have lost the archive, and a write retried alone would name an archive
        that is not there (the fault run, seed 101: a foreign-key violation)."""

        def upload_then_write(c: psycopg.Connection) -> T:
            result_sha = None
            if members:
                try:
                    result_sha = store.put_tree(c, self.db.store, tomodir, members=members).sha256
                except OSError as exc:
                    raise NodeFailure(f"cannot pack the results: {exc}", space=_no_space(exc)) from exc
            return write(c, result_sha)

        return upload_then_write

    def _unpack_input(self, conn: psycopg.Connection, job: jobs.Job, tmp: Path, tomodir: Path) -> None:
        # Typical inputs stay in memory between download and unpacking (a file
        # written, read back and removed was a tenth of a tiny job's overhead).
        with Spool(INPUT_SPOOL_BYTES, tmp, "input.tar.zst") as fh:
            size = store.fetch(conn, self.db.store, job.input_sha256, fh)
            tomodir.mkdir()
            archive.unpack(fh.source(), tomodir, limits=self.limits, size=size)

    def _run_solvers(self, job: jobs.Job, tomodir: Path, running: Running) -> solvers.Verdict:
        timeout = job.timeout_s if job.timeout_s is not None else self.options.timeout_s
        verdict = solvers.Verdict(True)
        with open(tomodir / LOG_NAME, "wb") as log_file:
            for step in job.steps:
                solver = self.solvers[solvers.STEP_SOLVER[step]]
                started = time.monotonic()
                self._scratch_watch.solver_started()
                try:
                    outcome = solvers.run_step(
                        solver,
                        tomodir,
                        step=step,
                        threads=running.cpus,
                        log=log_file,
                        timeout=timeout,
                        abort=running.abort,
                        nice=self._orders.nice if self._orders.nice is not None else self.options.nice,
                    )
                except OSError as exc:
                    raise NodeFailure(f"cannot start {solver.path}: {exc}") from exc
                finally:
                    self._scratch_watch.solver_ended()
                running.elapsed += outcome.elapsed
                if outcome.returncode == -signal.SIGILL:
                    raise NodeFailure(f"{solver.path} died of SIGILL (built for another CPU?)")
                if outcome.returncode in CANNOT_EXECUTE:
                    # setpriv (and a shell wrapper) exit 126/127 when the program cannot be run here.
                    raise NodeFailure(f"{solver.path} could not be executed on this node (exit {outcome.returncode})")
                full = scratch_full(tomodir, self._scratch_watch)
                if full is not None:
                    # Checked before the verdict: outputs cut short by a full disk are neither
                    # a result nor the job's failure.
                    raise NodeFailure(full, space=True)
                verdict = solvers.judge(outcome, tomodir, timeout)
                if not verdict.ok:
                    out_of_space = self._out_of_space(tomodir, started)
                    if out_of_space is not None:
                        raise NodeFailure(f"{verdict.reason}, {out_of_space}", space=True)
                    break
        return verdict

    def _out_of_space(self, tomodir: Path, started: float) -> str | None:
        """Why a failed step is the full scratch filesystem's doing (the space may be back
        by now: another slot freed it), or None."""
        where = tomodir.parent.parent
        seen = self._scratch_watch.full_since(started)
        if seen is not None:
            return (
                f"while the scratch filesystem at {where} was full ({time.monotonic() - seen:.1f} s ago): "
                "not the job's failure; free space there or point --workdir at a larger filesystem"
            )
        if ran_out_of_space(tomodir, tomodir / LOG_NAME):
            return (
                f"saying it had no space left on the scratch filesystem at {where}: not the job's "
                "failure; free space there or point --workdir at a larger filesystem"
            )
        return None

    def _report_failure(
        self,
        conn: psycopg.Connection | None,
        running: Running,
        category: str,
        reason: str,
        exit_code: int | None,
        result_sha: str | None,
        tomodir: Path | None = None,
        members: list[str] | None = None,
    ) -> None:
        """Record the job's failure; with ``members`` (files of tomodir) they are uploaded
        first, in the same retried write, and the failure names their archive."""
        job = running.job
        detail = self._provenance(running, tomodir) if tomodir is not None else None

        def write(c: psycopg.Connection, uploaded: str | None) -> bool:
            return jobs.fail(
                c,
                job,
                category=category,
                reason=reason,
                exit_code=exit_code,
                result_sha256=uploaded if members else result_sha,
                actor=self.actor,
                detail=detail,
            )

        ok = self._persist(conn, running, self._uploaded(tomodir, members, write) if members else lambda c: write(c, None))
        if ok:
            self.tally.failed += 1
            self._ended(job, JobStatus.FAILED, f"job {job.id}: failed ({category}): {reason}")
        else:
            self._refused(job, by_database=ok is False)

    def _ended(self, job: jobs.Job, status: JobStatus, message: str) -> None:
        self.on_event(message)
        self.on_job_end(job.id, status, message)

    def _provenance(self, running: Running, tomodir: Path) -> dict[str, object]:
        """What computed this result, for the events table: binaries, threads, time, log tail."""
        used = {solvers.STEP_SOLVER[step] for step in running.job.steps}
        return {
            "solvers": {name: info for name, info in self._solver_info.items() if name in used},
            "threads": running.cpus,
            "elapsed_s": round(running.elapsed, 3),
            "log_tail": _tail(tomodir / LOG_NAME),
        }


def _tail(path: Path, lines: int = 20, max_bytes: int = 8192) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
            return fh.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
