"""Slots: the threads that run claimed jobs, one job at a time each.

The control loop claims within the CPU budget (``_claim``, on the control
connection) and hands each job to an idle slot; the slot opens a connection
only for the job's transfers, hands the job to the pipeline and decides
what an error means: the job's own content (it fails), the node (the job goes
back, capped per job, and this worker leaves it to others for a while), or the
database (the job goes back when it can be told).  A slot never ends silently.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import psycopg

from cr_queue.job_states import JobStatus
from cr_queue.queries import jobs
from cr_queue.worker.reconnect import CONNECTION_ERRORS, first_line as _first_line
from cr_queue.worker.options import AVOID_S, EXIT_NODE_BROKEN, NodeFailure, Running

log = logging.getLogger(__name__)


class SlotsMixin:
    """The slot part of Worker (its state lives in Worker.__init__)."""

    def _slot(self, index: int) -> None:
        """Wait for a job the control loop claimed (control.py), run it, wait again.

        An idle slot holds no connection and sleeps on the hand-off queue; it ends at
        the None the control loop queues for each slot once the worker stops, behind
        every job it claimed (the claims and that None are serialised on one lock)."""
        while True:
            running = self._handoff.get()
            if running is None:
                return
            try:
                self._run_claimed(index, running)
            except Exception:
                # Never end a slot silently: a bug is shown with its traceback, the slot goes on.
                log.exception("slot %s: unexpected error; going on", index)

    def _run_claimed(self, index: int, running: Running) -> None:
        """Run one claimed job on a connection of its own, opened for the input and closed
        while the solver runs (the result's writes open one again: pipeline._persist)."""
        job = running.job
        if self._aborting.is_set():
            running.stop("release")
        conn: psycopg.Connection | None = None
        try:
            if running.why is not None:
                # Given up before it started (a stop order came with the claim): no input to fetch.
                self._stopped_early(None, running)
                return
            conn = self._connect(f"slot {index}")
            self._process(conn, running)
            self._node_failures = 0
        except CONNECTION_ERRORS as exc:
            self._connection_lost(conn, running, exc)
        except Exception as exc:
            blame = _content_error(exc, job)
            if blame is not None:
                # The job's own content cannot exist here: its fault, not the node's.
                self._node_failures = 0
                self._report_failure(conn, running, "input_path", blame, None, None)
            elif isinstance(exc, NodeFailure):
                self._node_trouble(conn, running, str(exc), counts=not exc.room_again)
            else:
                log.exception("job %s: unexpected error", job.id)
                self._node_trouble(conn, running, f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                self._busy -= 1
                if self._held.get(job.id) is running:  # not when a newer attempt took the job (control.py)
                    del self._held[job.id]
            with self._claim_lock:
                self._cpus_used -= running.cpus
            self._kick()

    def _nothing_left(self, conn: psycopg.Connection) -> bool:
        """Whether a --quit-when-empty worker may stop: nothing to claim even after a rescue
        sweep, and no running job of a lost worker waiting for one (a pilot started after a
        node crash must run that node's jobs, not leave them queued with nobody to take them)."""
        if self._rescue(conn):
            return False
        return jobs.count_orphaned(conn) == 0

    def _threads(self) -> int:
        return self._orders.threads or self.options.threads

    def _cost(self, job: jobs.Job) -> int:
        """CPUs a job occupies: what it asked for, at least the node's thread setting."""
        return max(job.threads, self._threads())

    def _claim(self, conn: psycopg.Connection) -> tuple[jobs.Job, int] | None:
        """Claim a job that fits the CPU budget; claims are serialised so two slots cannot overbook it."""
        with self._claim_lock:
            budget = self._orders.cpus or self.options.cpus
            free = None if budget is None else budget - self._cpus_used
            if free is not None and free < self._threads():
                return None
            job = jobs.claim(
                conn,
                actor=self.actor,
                can_mod="crmod" in self.solvers,
                can_inv="crtomo" in self.solvers,
                groups=self.options.groups,
                lease_s=self.options.lease_s,
                max_threads=free,
                avoid=self._avoided(),
            )
            if job is None:
                return None
            cost = self._cost(job)
            self._cpus_used += cost
            return job, cost

    def _avoided(self) -> list[int]:
        """Jobs this worker gave back after a node failure within AVOID_S: another worker tries them first."""
        now = time.monotonic()
        for job_id, when in list(self._gave_back.items()):
            if now - when > AVOID_S:
                del self._gave_back[job_id]
        return list(self._gave_back)

    def _connection_lost(self, conn: psycopg.Connection | None, running: Running, exc: Exception) -> None:
        """The database went away while the input was being fetched: give the job back.

        Neither the job's fault nor the node's, so no try is burned and the
        node-failure count is left alone; the release waits for the database.
        """
        job = running.job
        self.on_event(f"job {job.id}: database connection lost before the solver ran ({_first_line(exc)}); giving it back")
        if self._persist(conn, running, lambda c: jobs.release(c, job, reason="database connection lost", actor=self.actor)):
            self.tally.released += 1

    def _node_trouble(self, conn: psycopg.Connection | None, running: Running, reason: str, *, counts: bool = True) -> None:
        """Give the job back without burning a try; after too many in a row, stop this node.

        The job fails as node_failures once several nodes gave it back so
        (jobs.release_node_failure: a node is this host and --workdir, whichever
        worker process runs there), and this worker leaves it to others for a
        while: one job cannot take down every worker that reaches it.  A failure
        that does not count (a full scratch with room again once the job's files
        were gone) leaves the count as it was: a node whose scratch is too small
        for some jobs still runs the others (the fault run, seed 303, saw such a
        worker exit 3 and leave the fleet for good).
        """
        job = running.job
        if counts:
            self._node_failures += 1
        kept = "" if counts else " (the scratch filesystem has room again without it: this node goes on)"
        self.on_event(f"job {job.id}: this node could not run it ({reason}); giving it back to the queue{kept}")
        # Avoided before it is back in the queue: the control loop claims for another idle
        # slot meanwhile and must not take it straight back (the suite saw it, under load).
        self._gave_back[job.id] = time.monotonic()
        status = self._persist(
            conn,
            running,
            lambda c: jobs.release_node_failure(c, job, reason=reason, scratch=str(self.workdir), actor=self.actor),
        )
        self._gave_back[job.id] = time.monotonic()
        if status == JobStatus.FAILED:
            self.tally.failed += 1
            self._ended(job, JobStatus.FAILED, f"job {job.id}: failed (node_failures): no worker could run it")
        elif status is not None:
            self.tally.released += 1
        if self._node_failures >= self.options.max_node_failures and not self._stopping.is_set():
            self.exit_code = EXIT_NODE_BROKEN
            message = (
                f"node broken: {self._node_failures} jobs in a row failed here for reasons not "
                f"attributable to the jobs (last: {reason}); claiming no more"
            )
            self.on_event(message)
            log.error("%s", message)
            self.request_stop(abort=True, reason=message)


def _content_error(exc: BaseException | None, job: jobs.Job) -> str | None:
    """Why the job's own content cannot exist on this node (a path longer than the system
    allows under the scratch directory), or None when the error is not the job's doing.
    The path is named as the user knows it: under the tomodir they added."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            scratch = os.fsdecode(exc.filename or "")
            inside = scratch.split("/tomodir/", 1)[1] if "/tomodir/" in scratch else scratch
            return (
                f"the path {job.source_path}/{inside} is too long for this worker's scratch directory "
                f"({len(scratch)} characters there, more than the system allows); "
                "shorten the tomodir's deepest paths (or run it on a worker with a shorter --workdir)"
            )
        exc = exc.__cause__
    return None
