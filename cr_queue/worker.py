"""The worker daemon: claims jobs, runs the solvers, sends results back.

Threads and connections, and why:

* one *slot* thread per concurrent job, each with its own connection: the
  claim takes a session advisory lock on that connection, and the lock must
  live exactly as long as the job does;
* one *heartbeat* thread with its own connection renews the leases every
  lease/3, so a solver that hogs the CPU or a slow upload cannot starve it;
* the main thread listens for NOTIFY (waking idle slots at once), runs the
  rescue sweep that returns lost workers' jobs, and handles signals.

No transaction stays open while a solver runs: every statement is short.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from . import __version__, archive, queue, solvers, store
from .db import Database

log = logging.getLogger(__name__)

LOG_NAME = "exe/crh_solver.log"
FAILURE_MEMBERS = ("exe/error.dat", LOG_NAME)


@dataclass
class WorkerOptions:
    jobs: int = 1
    threads: int = 1
    name: str | None = None
    quit_when_empty: bool = False
    groups: tuple[str, ...] = ()
    lease_s: float = 30.0
    poll_s: float = 5.0
    rescue_s: float = 2.0
    timeout_s: float | None = None
    workdir: Path | None = None


@dataclass
class _Running:
    job: queue.Job
    abort: threading.Event = field(default_factory=threading.Event)
    lost: bool = False


@dataclass
class Tally:
    finished: int = 0
    failed: int = 0
    refused: int = 0
    released: int = 0


class Worker:
    def __init__(
        self,
        db: Database,
        solver_map: dict[str, solvers.Solver],
        options: WorkerOptions,
        *,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.solvers = solver_map
        self.options = options
        self.host = socket.gethostname()
        self.name = options.name or f"{self.host}-{os.getpid()}"
        self.on_event = on_event or (lambda message: log.info("%s", message))
        self.tally = Tally()
        self._stopping = threading.Event()
        self._abort_all = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._generation = 0
        self._busy = 0
        self._held: dict[int, _Running] = {}
        self.worker_id: int | None = None
        self.actor = queue.Actor()

    # ----------------------------------------------------------- lifecycle

    def run(self) -> int:
        control = self.db.connect(f"crh_worker {self.name}")
        try:
            self.worker_id = queue.register_worker(
                control,
                name=self.name,
                host=self.host,
                pid=os.getpid(),
                version=__version__,
                jobs=self.options.jobs,
                threads=self.options.threads,
                groups=self.options.groups,
                solvers={name: str(s.path) for name, s in self.solvers.items()},
            )
            self.actor = queue.Actor(worker_id=self.worker_id)
            self.on_event(
                f"worker {self.name} (id {self.worker_id}) started: {self.options.jobs} job(s) at a time, "
                f"{self.options.threads} thread(s) each, solvers: "
                + ", ".join(f"{solvers.DISPLAY[n]}={s.path}" for n, s in sorted(self.solvers.items()))
            )
            queue.listen(control)
            self._rescue(control)
            threads = [
                threading.Thread(target=self._slot, args=(i,), name=f"slot-{i}", daemon=True)
                for i in range(self.options.jobs)
            ]
            beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
            beat.start()
            for t in threads:
                t.start()
            self._main_loop(control, threads)
            for t in threads:
                t.join()
            reason = "quit: queue empty" if self.options.quit_when_empty else "stopped"
            queue.stop_worker(control, self.worker_id, reason)
        finally:
            self._stopping.set()
            control.close()
        self.on_event(
            f"worker {self.name} stopped: {self.tally.finished} finished, {self.tally.failed} failed"
            + (f", {self.tally.released} given back" if self.tally.released else "")
            + (f", {self.tally.refused} results refused (stale attempt)" if self.tally.refused else "")
        )
        return 0

    def request_stop(self, *, abort: bool = False) -> None:
        """First call: stop claiming and let running jobs finish. With abort: give them back now."""
        self._stopping.set()
        if abort:
            self._abort_all.set()
            with self._lock:
                for running in self._held.values():
                    running.abort.set()
        self._kick()

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            again = self._stopping.is_set()
            self.on_event(
                f"received {signal.Signals(signum).name}: "
                + ("giving running jobs back to the queue" if again else "finishing running jobs, claiming no more")
            )
            self.request_stop(abort=again)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # ------------------------------------------------------------ main loop

    def _main_loop(self, control: psycopg.Connection, threads: list[threading.Thread]) -> None:
        next_rescue = time.monotonic() + self.options.rescue_s
        while any(t.is_alive() for t in threads):
            woke = False
            for _ in control.notifies(timeout=min(0.5, self.options.poll_s), stop_after=1):
                woke = True
            if woke:
                self._kick()
            if time.monotonic() >= next_rescue:
                self._rescue(control)
                next_rescue = time.monotonic() + self.options.rescue_s

    def _rescue(self, conn: psycopg.Connection) -> None:
        for job_id, status in queue.rescue(conn, self.actor):
            self.on_event(f"job {job_id}: its worker was lost; now {status}")
            if status == "queued":
                self._kick()

    def _kick(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    # ---------------------------------------------------------------- slots

    def _slot(self, index: int) -> None:
        conn: psycopg.Connection | None = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.db.connect(f"crh_worker {self.name} slot {index}")
                    backoff = 0.5
                if not self._claim_and_run(conn):
                    break
            except psycopg.OperationalError as exc:
                # The database went away: any job we held is rescued by its lock or lease.
                self.on_event(f"slot {index}: database connection lost ({exc}); reconnecting in {backoff:g} s")
                if conn is not None:
                    conn.close()
                conn = None
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        if conn is not None:
            conn.close()

    def _claim_and_run(self, conn: psycopg.Connection) -> bool:
        """One round of a slot; False when the slot should end."""
        with self._wake:
            seen = self._generation
        job = queue.claim(
            conn,
            actor=self.actor,
            can_mod="crmod" in self.solvers,
            can_inv="crtomo" in self.solvers,
            groups=self.options.groups,
            lease_s=self.options.lease_s,
        )
        if job is None:
            with self._lock:
                idle_everywhere = self._busy == 0
            if self.options.quit_when_empty and idle_everywhere:
                self._stopping.set()
                self._kick()
                return False
            with self._wake:
                if self._generation == seen and not self._stopping.is_set():
                    self._wake.wait(timeout=self.options.poll_s)
            return True
        with self._lock:
            self._busy += 1
            running = self._held[job.id] = _Running(job)
        try:
            self._process(conn, running)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            # A bug or a node problem (disk full, ...) is not the job's fault: give it back.
            log.exception("job %s: unexpected error", job.id)
            self.on_event(f"job {job.id}: worker error ({type(exc).__name__}: {exc}); giving it back to the queue")
            if queue.release(conn, job, reason=f"worker error: {exc}", actor=self.actor):
                self.tally.released += 1
        finally:
            with self._lock:
                self._busy -= 1
                del self._held[job.id]
            if not conn.closed:
                try:
                    queue.unlock(conn, job.id)
                except psycopg.OperationalError:
                    pass
            self._kick()
        return True

    # ------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        conn = self.db.connect(f"crh_worker {self.name} heartbeat")
        try:
            while not self._stopping.wait(self.options.lease_s / 3) or self._held:
                with self._lock:
                    held = [(r.job.id, r.job.attempt) for r in self._held.values()]
                still_ours = queue.renew(conn, self.worker_id, held, self.options.lease_s)
                with self._lock:
                    for job_id, _attempt in held:
                        running = self._held.get(job_id)
                        if running is not None and job_id not in still_ours:
                            running.lost = True
                            running.abort.set()
                if self._stopping.is_set() and not self._held:
                    break
        finally:
            conn.close()

    # ------------------------------------------------------------------ jobs

    def _process(self, conn: psycopg.Connection, running: _Running) -> None:
        job = running.job
        self.on_event(f"job {job.id}: started attempt {job.attempt} ({'+'.join(job.steps)}) from {job.source_path}")
        tmp = Path(tempfile.mkdtemp(prefix=f"crh-job{job.id}-", dir=self.options.workdir))
        try:
            tomodir = tmp / "tomodir"
            try:
                self._unpack_input(conn, job, tmp, tomodir)
            except (archive.UnsafeArchive, archive.ChecksumMismatch, store.BlobMissing) as exc:
                self._finish_failed(conn, job, "input_archive", f"the input archive cannot be used: {exc}", None, None)
                return
            solvers.prepare(tomodir)
            before = archive.snapshot(tomodir)
            verdict = self._run_solvers(job, tomodir, running)
            if running.lost:
                self.tally.refused += 1
                self.on_event(f"job {job.id}: attempt {job.attempt} is no longer this worker's; result discarded")
                return
            if verdict.category == "aborted":
                if queue.release(conn, job, reason="worker shut down", actor=self.actor):
                    self.tally.released += 1
                    self.on_event(f"job {job.id}: given back to the queue")
                return
            if verdict.ok:
                members = archive.changed_since(tomodir, before)
                result = store.put_tree(conn, tomodir, members=members)
                if queue.complete(conn, job, result_sha256=result.sha256, exit_code=verdict.exit_code, actor=self.actor):
                    self.tally.finished += 1
                    files = sum(1 for m in members if (tomodir / m).is_file())
                    self.on_event(f"job {job.id}: finished ({files} result files)")
                else:
                    self.tally.refused += 1
                    self.on_event(f"job {job.id}: completion refused, attempt {job.attempt} is stale; result discarded")
                return
            members = [m for m in FAILURE_MEMBERS if (tomodir / m).exists()]
            result_sha = store.put_tree(conn, tomodir, members=members).sha256 if members else None
            self._finish_failed(conn, job, verdict.category, verdict.reason, verdict.exit_code, result_sha)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _unpack_input(self, conn: psycopg.Connection, job: queue.Job, tmp: Path, tomodir: Path) -> None:
        packed = tmp / "input.tar.zst"
        with open(packed, "wb") as fh:
            store.fetch(conn, job.input_sha256, fh)
        tomodir.mkdir()
        with open(packed, "rb") as fh:
            archive.unpack(fh, tomodir)
        packed.unlink()

    def _run_solvers(self, job: queue.Job, tomodir: Path, running: _Running) -> solvers.Verdict:
        timeout = job.timeout_s if job.timeout_s is not None else self.options.timeout_s
        verdict = solvers.Verdict(True)
        with open(tomodir / LOG_NAME, "wb") as log_file:
            for step in job.steps:
                solver = self.solvers[solvers.STEP_SOLVER[step]]
                outcome = solvers.run_step(
                    solver,
                    tomodir,
                    step=step,
                    threads=job.threads if job.threads > 1 else self.options.threads,
                    log=log_file,
                    timeout=timeout,
                    abort=running.abort,
                )
                verdict = solvers.judge(outcome, tomodir, timeout)
                if not verdict.ok:
                    break
        return verdict

    def _finish_failed(
        self,
        conn: psycopg.Connection,
        job: queue.Job,
        category: str,
        reason: str,
        exit_code: int | None,
        result_sha: str | None,
    ) -> None:
        if queue.fail(
            conn,
            job,
            category=category,
            reason=reason,
            exit_code=exit_code,
            result_sha256=result_sha,
            actor=self.actor,
        ):
            self.tally.failed += 1
            self.on_event(f"job {job.id}: failed ({category}): {reason}")
        else:
            self.tally.refused += 1
            self.on_event(f"job {job.id}: failure report refused, attempt {job.attempt} is stale")
