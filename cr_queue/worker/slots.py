"""Slots: the threads that claim jobs and run them, one job at a time each.

A slot claims within the CPU budget, hands the job to the pipeline and decides
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
from cr_queue.worker.reconnect import Backoff, first_line as _first_line
from cr_queue.worker.options import AVOID_S, EXIT_NODE_BROKEN, NodeFailure, Running

log = logging.getLogger(__name__)


class SlotsMixin:
    """The slot part of Worker (its state lives in Worker.__init__)."""

    def _slot(self, index: int) -> None:
        conn: psycopg.Connection | None = None
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect(f"slot {index}")
                    backoff.reset()
                if not self._claim_and_run(conn):
                    break
            except Exception as exc:
                # Never end a slot silently: a lost connection is waited out, a bug is shown
                # with its traceback, and the slot goes on claiming.
                if isinstance(exc, psycopg.OperationalError):
                    self.on_event(
                        f"slot {index}: database connection lost ({_first_line(exc)}); reconnecting in {backoff.step:g} s"
                    )
                else:
                    log.exception("slot %s: unexpected error; going on in %g s", index, backoff.step)
                if conn is not None:
                    conn.close()
                conn = None
                backoff.wait(self._stopping)
        if conn is not None:
            conn.close()

    def _claim_and_run(self, conn: psycopg.Connection) -> bool:
        """One round of a slot; False when the slot should end."""
        with self._wake:
            seen = self._generation
        if not self._orders.active:
            # An inactive node waits for its admin; it is not an empty jobs.
            self._stopping.wait(self.options.poll_s)
            return True
        claimed = self._claim(conn)
        if claimed is None:
            with self._lock:
                idle_everywhere = self._busy == 0
            if self.options.quit_when_empty and idle_everywhere and self._nothing_left(conn):
                self.request_stop(reason="queue empty")
                return False
            with self._wake:
                if self._generation == seen and not self._stopping.is_set():
                    self._wake.wait(timeout=self.options.poll_s)
            return True
        job, cost = claimed
        with self._lock:
            self._busy += 1
            stale = self._held.get(job.id)
            if stale is not None:
                # An earlier attempt of this very job, in another slot, is no longer ours: the
                # worker was stopped past its lease (SIGSTOP, a frozen VM), the job was rescued
                # and this slot claimed it again.  The old slot stops; the job is this slot's.
                stale.stop("lost")
            running = self._held[job.id] = Running(job, cpus=cost)
        # One notification woke one slot; if more jobs came at once, the next idle slot looks.
        self._kick(one=True)
        try:
            self._process(conn, running)
            self._node_failures = 0
        except psycopg.OperationalError as exc:
            self._connection_lost(conn, running, exc)
        except Exception as exc:
            blame = _content_error(exc, job)
            if blame is not None:
                # The job's own content cannot exist here: its fault, not the node's.
                self._node_failures = 0
                self._report_failure(conn, running, "input_path", blame, None, None)
            elif isinstance(exc, NodeFailure):
                self._node_trouble(conn, running, str(exc))
            else:
                log.exception("job %s: unexpected error", job.id)
                self._node_trouble(conn, running, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._busy -= 1
                if self._held.get(job.id) is running:  # not when a newer attempt took the job (above)
                    del self._held[job.id]
            with self._claim_lock:
                self._cpus_used -= cost
            self._kick()
        return True

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

    def _connection_lost(self, conn: psycopg.Connection, running: Running, exc: psycopg.OperationalError) -> None:
        """The database went away while the input was being fetched: give the job back.

        Neither the job's fault nor the node's, so no try is burned and the
        node-failure count is left alone; the release waits for the database.
        """
        job = running.job
        self.on_event(f"job {job.id}: database connection lost before the solver ran ({_first_line(exc)}); giving it back")
        if self._persist(conn, running, lambda c: jobs.release(c, job, reason="database connection lost", actor=self.actor)):
            self.tally.released += 1

    def _node_trouble(self, conn: psycopg.Connection, running: Running, reason: str) -> None:
        """Give the job back without burning a try; after too many in a row, stop this node.

        The job fails as node_failures once several nodes gave it back so
        (jobs.release_node_failure: a node is this host and --workdir, whichever
        worker process runs there), and this worker leaves it to others for a
        while: one job cannot take down every worker that reaches it.
        """
        job = running.job
        self._node_failures += 1
        self.on_event(f"job {job.id}: this node could not run it ({reason}); giving it back to the queue")
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
