"""The worker daemon: claims jobs, runs the solvers, sends results back.

Threads and connections, and why:

* one *slot* thread per concurrent job, each with its own connection, so a
  slow upload in one job never delays another;
* one *heartbeat* thread with its own connection holds the advisory lock that
  says "this worker is alive" and renews the leases every couple of seconds,
  so a solver that hogs the CPU or a slow upload cannot starve it;
* the main thread listens for NOTIFY (new jobs wake idle slots at once, a
  cancel stops a running solver), runs the rescue sweep that returns lost
  workers' jobs, and watches the clock: drain timeout, max runtime, and a
  lease that could not be renewed for half its length.

No transaction stays open while a solver runs: every statement is short.
Losing the database is survivable: every connection reconnects with backoff,
solvers keep running, and a result is uploaded once the database is back, as
long as the attempt is still this worker's (the database decides: fencing).
"""

from __future__ import annotations

import errno
import logging
import os
import queue as _queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psycopg

from cr_queue import __version__
from cr_queue.tomodir import archive
from cr_queue.job_states import JobStatus
from cr_queue.queries import jobs, session, workers
from cr_queue.solvers import reaper, solvers
from cr_queue import store
from cr_queue.db.connection import Database
from cr_queue.util.spool import Spool
from cr_queue.worker.reconnect import CAP_S, Backoff, Connector, first_line as _first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_NAME = "exe/crh_solver.log"
FAILURE_MEMBERS = ("exe/error.dat", LOG_NAME)
TMP_PREFIX = "crh-w"
EXIT_NODE_BROKEN = 3
# A worker that ends because of a bug of its own must not look like one that ended well.
EXIT_INTERNAL_ERROR = 1
CANNOT_EXECUTE = (126, 127)
# A job this worker gave back after a node failure is left to other workers this long.
AVOID_S = 60.0
# Less free space than this on the scratch filesystem when a solver ends: it was full, and
# whatever the solver wrote may be cut short (the real solvers exit 0 regardless).
SCRATCH_MIN_FREE = 1 << 20
# Input archives up to this size are held in memory; larger ones spill to a file in the job's directory.
INPUT_SPOOL_BYTES = 16 << 20


@dataclass
class WorkerOptions:
    jobs: int = 1
    threads: int = 1
    name: str | None = None
    quit_when_empty: bool = False
    groups: tuple[str, ...] = ()
    lease_s: float = 30.0
    heartbeat_s: float = 2.0
    poll_s: float = 5.0
    rescue_s: float = 2.0
    timeout_s: float | None = None
    drain_timeout_s: float | None = None
    max_runtime_s: float | None = None
    max_node_failures: int = 5
    nice: int = 0
    # CPU budget: with it, as many jobs run at once as their threads fit in.
    cpus: int | None = None
    workdir: Path | None = None


@dataclass
class _Running:
    job: jobs.Job
    abort: threading.Event = field(default_factory=threading.Event)
    # Why the solver was stopped: "lost" (the database says the attempt is no longer ours),
    # "stale" (no news for half a lease: it may have been given to another worker),
    # "cancelled", or "release".
    why: str | None = None
    cpus: int = 1
    elapsed: float = 0.0

    def stop(self, why: str) -> None:
        if self.why is None:
            self.why = why
        self.abort.set()


@dataclass
class Tally:
    finished: int = 0
    failed: int = 0
    refused: int = 0
    released: int = 0
    cancelled: int = 0


class NodeFailure(Exception):
    """This node cannot run jobs (solver will not start, disk full, ...): not the job's fault."""


class Worker:
    def __init__(
        self,
        db: Database,
        solver_map: dict[str, solvers.Solver],
        options: WorkerOptions,
        *,
        limits: archive.Limits,
        on_event: Callable[[str], None] | None = None,
        on_job_end: Callable[[int, str, str], None] | None = None,
    ) -> None:
        self.db = db
        self.solvers = solver_map
        self.options = options
        self.limits = limits  # the caps on unpacking an input (config.archive_limits)
        self.host = socket.gethostname()
        self.name = options.name or f"{self.host}-{os.getpid()}"
        self.on_event = on_event or (lambda message: log.info("%s", message))
        # (job id, JobStatus.FINISHED or FAILED, the event's text): for whoever counts the jobs that ended.
        self.on_job_end = on_job_end or (lambda job_id, status, message: None)
        self.tally = Tally()
        self.exit_code = 0
        self.stop_reason = "stopped"
        self.workdir = Path(options.workdir or tempfile.gettempdir())
        self._stopping = threading.Event()
        # Set when running jobs are to be given up now: nobody waits for the database any more.
        self._aborting = threading.Event()
        self._connector = Connector(db, self.name, self._idle_transaction_limit)
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._generation = 0
        self._trash: _queue.SimpleQueue[Path | None] | None = None
        self._token = False
        self._trash_thread: threading.Thread | None = None
        self._busy = 0
        self._node_failures = 0
        # Jobs given back after a node failure: job id -> when (time.monotonic()).
        self._gave_back: dict[int, float] = {}
        self._held: dict[int, _Running] = {}
        self._claim_lock = threading.Lock()
        self._cpus_used = 0
        self._orders = workers.Orders()
        self._last_renewal = time.monotonic()
        self._drain_deadline: float | None = None
        self._started = time.monotonic()
        self.worker_id: int | None = None
        self.actor = jobs.Actor()
        # Which binaries computed the results: recorded with every outcome.
        self._solver_info = {name: s.describe() for name, s in self.solvers.items()}

    # ----------------------------------------------------------- lifecycle

    def run(self) -> int:
        control = self.db.connect(f"crh_worker {self.name} control", keepalive=True)
        session.bound_idle_transactions(control, self._idle_transaction_limit)
        self.worker_id = workers.register_worker(
            control,
            name=self.name,
            host=self.host,
            pid=os.getpid(),
            version=__version__,
            jobs=self.options.cpus or self.options.jobs,
            threads=self.options.threads,
            groups=self.options.groups,
            solvers=self._solver_info,
        )
        self.actor = jobs.Actor(worker_id=self.worker_id)
        self._obey(workers.beat(control, self.worker_id, draining=False))
        self.on_event(
            f"worker {self.name} (id {self.worker_id}) started: {self.options.jobs} job(s) at a time, "
            f"{self.options.threads} thread(s) each, solvers: "
            + ", ".join(f"{solvers.DISPLAY[n]}={s.path}" for n, s in sorted(self.solvers.items()))
        )
        self._sweep_tmp()
        # A solver's detached descendants come back to this process, to be ended with its step.
        reaper.become_subreaper()
        beat = threading.Thread(target=self._guarded, args=(self._heartbeat,), name="heartbeat", daemon=True)
        beat.start()
        threading.Thread(target=self._guarded, args=(self._watchdog,), name="watchdog", daemon=True).start()
        slots = [
            threading.Thread(target=self._guarded, args=(self._slot, i), name=f"slot-{i}", daemon=True)
            for i in range(self.options.cpus or self.options.jobs)
        ]
        for t in slots:
            t.start()
        try:
            control = self._main_loop(control, slots)
        except BaseException:
            self.exit_code = EXIT_INTERNAL_ERROR
            raise
        finally:
            self._stopping.set()
            self._kick()
            for t in slots:
                t.join()
            self._finished.set()
            beat.join(timeout=10)
            self._discard(None)
        self._run_db(lambda conn: workers.stop_worker(conn, self.worker_id, self.stop_reason), control)
        self.on_event(
            f"worker {self.name} stopped ({self.stop_reason}): {self.tally.finished} finished, "
            f"{self.tally.failed} failed"
            + (f", {self.tally.released} given back" if self.tally.released else "")
            + (f", {self.tally.cancelled} cancelled" if self.tally.cancelled else "")
            + (f", {self.tally.refused} results refused (stale attempt)" if self.tally.refused else "")
        )
        return self.exit_code

    def request_stop(self, *, abort: bool = False, reason: str | None = None) -> None:
        """Stop claiming and let running jobs finish; with abort, give them back at once."""
        if reason and not self._stopping.is_set():
            self.stop_reason = reason
        self._stopping.set()
        if self._drain_deadline is None and self.options.drain_timeout_s is not None:
            self._drain_deadline = time.monotonic() + self.options.drain_timeout_s
        if abort:
            self._aborting.set()
            self._stop_all("release")
        self._kick()

    def _guarded(self, target: Callable[..., None], *args) -> None:
        """Run a thread's loop; if a bug ends it, say so with the traceback and end the worker
        with a non-zero exit code, instead of carrying on without the thread."""
        try:
            target(*args)
        except BaseException as exc:
            log.exception("internal error in thread %s", threading.current_thread().name)
            self.exit_code = EXIT_INTERNAL_ERROR
            self.request_stop(abort=True, reason=f"internal error: {type(exc).__name__}: {exc}")

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            again = self._stopping.is_set()
            name = signal.Signals(signum).name
            if again:
                self.on_event(f"received {name} again: giving running jobs back to the queue")
            else:
                drain = self.options.drain_timeout_s
                self.on_event(
                    f"received {name}: claiming no more, letting running jobs finish"
                    + (f" for up to {drain:g} s" if drain is not None else "")
                    + " (send it again to give them back now)"
                )
            self.request_stop(abort=again, reason=f"stopped by {name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # ------------------------------------------------------------ main loop

    def _main_loop(self, control: psycopg.Connection | None, slots: list[threading.Thread]) -> psycopg.Connection | None:
        next_rescue = 0.0
        backoff = Backoff()
        while any(t.is_alive() for t in slots):
            try:
                if control is None or control.closed:
                    control = self._connect("control")
                    backoff.reset()
                    next_rescue = 0.0
                workers.listen(control, jobs=False)
                self._token = False  # a new session holds no lock
                while any(t.is_alive() for t in slots):
                    for note in control.notifies(timeout=0.25, stop_after=1):
                        self._on_notify(note)
                    self._follow_token(control, len(slots))
                    if time.monotonic() >= next_rescue:
                        self._rescue(control)
                        self._sweep_tmp()
                        next_rescue = time.monotonic() + self.options.rescue_s
            except Exception as exc:
                if isinstance(exc, psycopg.OperationalError):
                    self._connector.saw_down(exc)
                    self.on_event(f"control connection lost ({_first_line(exc)}); reconnecting in {backoff.step:g} s")
                else:
                    log.exception("control loop: unexpected error; starting it again in %g s", backoff.step)
                if control is not None:
                    control.close()
                control = None
                backoff.wait()
        return control

    def _on_notify(self, note) -> None:
        if note.channel == workers.CANCEL_CHANNEL:
            with self._lock:
                running = self._held.get(int(note.payload or 0))
            if running is not None:
                self.on_event(f"job {running.job.id}: cancelled by its owner; stopping the solver")
                running.stop("cancelled")
        elif self._serves_group(note.payload):
            # One notification is one job: wake one idle slot, not all of them (they would
            # all race for the claim, and all but one find nothing).
            self._kick(one=True)

    def _follow_token(self, conn: psycopg.Connection, n_slots: int) -> None:
        """Hold the wake token (and LISTEN for new jobs) while a slot is idle, pass it on when
        none is: then a new job wakes one worker, not every idle one (workers.take_wake_token)."""
        with self._lock:
            idle = self._busy < n_slots and not self._stopping.is_set()
        if idle and not self._token:
            if workers.take_wake_token(conn, self._token_key):
                self._token = True
                self._kick(one=True)  # a job may have come while nobody was listening
        elif self._token and not idle:
            workers.give_wake_token(conn, self._token_key)
            self._token = False

    @property
    def _token_key(self) -> int:
        """Workers that claim the same jobs (groups, solvers) share a token."""
        kind = f"{sorted(self.options.groups)} {sorted(self.solvers)}"
        return zlib.crc32(kind.encode()) - 2**31

    def _serves_group(self, payload: str | None) -> bool:
        """The trigger's payload is "<job id> <group>" (the group '' for none; before
        migration 0004 only the group); the claim takes only jobs without a group
        unless --group is given, then only those groups."""
        payload = payload or ""
        head, _, rest = payload.partition(" ")
        group = rest if head.isdigit() else payload
        if self.options.groups:
            return bool(group) and group in self.options.groups
        return not group

    def _watchdog(self) -> None:
        """Watch the clock from a thread that never waits for the database.

        Any statement can hang on a half-open connection (a wedged proxy or NAT
        still acknowledges, so keepalives see nothing); the main thread may be
        stuck in one, yet the half-lease rule, the drain timeout and the max
        runtime must still stop the solvers on time.
        """
        while not self._finished.wait(0.25):
            self._watch_clock()

    def _watch_clock(self) -> None:
        now = time.monotonic()
        with self._lock:
            held = [r for r in self._held.values() if r.why is None]
        if held and now - self._last_renewal > self.options.lease_s / 2 and not self._server_down(now):
            self.on_event(
                f"could not renew the leases for {now - self._last_renewal:.0f} s (over half the lease): "
                "stopping the solvers and giving up their jobs"
            )
            for running in held:
                running.stop("stale")
            return
        if self._drain_deadline is not None and now > self._drain_deadline and held:
            self.on_event("drain timeout reached: giving the running jobs back to the queue")
            self._stop_all("release")
        limit = self.options.max_runtime_s
        if limit is not None:
            elapsed = now - self._started
            # Stop claiming early enough to finish, and give back what cannot finish in time.
            if elapsed > limit * 0.9 and not self._stopping.is_set():
                self.on_event("max runtime almost reached: claiming no more jobs")
                self.request_stop(reason="max runtime reached")
            if elapsed > limit - min(30.0, limit * 0.05) and held:
                self.on_event("max runtime reached: giving the running jobs back to the queue")
                self._stop_all("release")

    def _server_down(self, now: float) -> bool:
        """Whether the database server was found down lately: then nobody can take our jobs
        (a lease that ran out meanwhile gets a grace after the restart, jobs.rescue), so the
        solvers keep running however long the outage lasts.  Silence (a half-open
        connection) is different: the server may be up and giving our jobs away."""
        down_at = self._connector.down_at
        return down_at is not None and now - down_at < max(self.options.lease_s / 2, 2 * CAP_S)

    def _stop_all(self, why: str) -> None:
        with self._lock:
            for running in self._held.values():
                running.stop(why)

    def _rescue(self, conn: psycopg.Connection) -> int:
        """Return lost workers' jobs to the queue; how many came back."""
        rescued = jobs.rescue(conn, self.actor)
        for job_id, status in rescued:
            self.on_event(f"job {job_id}: its worker was lost; now {status}")
            if status == "queued":
                self._kick()
        return len(rescued)

    def _kick(self, *, one: bool = False) -> None:
        """Wake idle slots: all of them, or with ``one`` a single one (a job notification)."""
        with self._wake:
            self._generation += 1
            if one:
                self._wake.notify(1)
            else:
                self._wake.notify_all()

    def _discard(self, path: Path | None) -> None:
        """Remove a finished job's directory in the background, so the slot claims its next
        job at once (removing a tomodir took 10-20 ms on a busy disk); None: wait until done."""
        with self._lock:
            if self._trash is None:
                if path is None:
                    return
                self._trash = _queue.SimpleQueue()
                self._trash_thread = threading.Thread(target=self._empty_trash, name="cleanup", daemon=True)
                self._trash_thread.start()
        self._trash.put(path)
        if path is None:
            self._trash_thread.join()

    def _empty_trash(self) -> None:
        while (path := self._trash.get()) is not None:
            shutil.rmtree(path, ignore_errors=True)

    def _sweep_tmp(self) -> None:
        """Remove job directories of workers on this node that died without cleaning up."""
        try:
            entries = list(os.scandir(self.workdir))
        except OSError:
            return
        mine = f"{TMP_PREFIX}{os.getpid()}-"
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX) or entry.name.startswith(mine):
                continue
            pid_text = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            try:
                if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid():
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass

    # ------------------------------------------------------- db connections

    def _connect(self, role: str) -> psycopg.Connection:
        return self._connector.connect(role)

    @property
    def _idle_transaction_limit(self) -> float:
        """A third of the lease: a transaction of a cut-off worker must end (and free the
        job's row for the rescue sweep) well before the lease does."""
        return self.options.lease_s / 3

    def _run_db(self, fn: Callable[[psycopg.Connection], T], conn: psycopg.Connection | None = None) -> T | None:
        """Run a statement, reconnecting once if the connection went away meanwhile."""
        for attempt in range(2):
            try:
                if conn is None or conn.closed:
                    conn = self._connect("control")
                return fn(conn)
            except psycopg.OperationalError as exc:
                if attempt:
                    self.on_event(f"database unreachable ({_first_line(exc)})")
                conn = None
        return None

    # ---------------------------------------------------------------- slots

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
            running = self._held[job.id] = _Running(job, cpus=cost)
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

    def _connection_lost(self, conn: psycopg.Connection, running: _Running, exc: psycopg.OperationalError) -> None:
        """The database went away while the input was being fetched: give the job back.

        Neither the job's fault nor the node's, so no try is burned and the
        node-failure count is left alone; the release waits for the database.
        """
        job = running.job
        self.on_event(f"job {job.id}: database connection lost before the solver ran ({_first_line(exc)}); giving it back")
        if self._persist(conn, running, lambda c: jobs.release(c, job, reason="database connection lost", actor=self.actor)):
            self.tally.released += 1

    def _node_trouble(self, conn: psycopg.Connection, running: _Running, reason: str) -> None:
        """Give the job back without burning a try; after too many in a row, stop this node.

        The job fails as node_failures once several workers gave it back so
        (jobs.release_node_failure), and this worker leaves it to others for a
        while: one job cannot take down every worker that reaches it.
        """
        job = running.job
        self._node_failures += 1
        self.on_event(f"job {job.id}: this node could not run it ({reason}); giving it back to the queue")
        status = self._persist(conn, running, lambda c: jobs.release_node_failure(c, job, reason=reason, actor=self.actor))
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

    # ------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        conn: psycopg.Connection | None = None
        # Liveness matters most: the heartbeat knocks more often than the other threads.
        backoff = Backoff(cap=2.0)
        while not self._finished.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect("heartbeat")
                    if not workers.hold_worker_lock(conn, self.worker_id):
                        log.warning("worker lock %s already held by an old session", self.worker_id)
                    backoff.reset()
                self._obey(workers.beat(conn, self.worker_id, draining=self._stopping.is_set()))
                with self._lock:
                    held = [(r.job.id, r.job.attempt) for r in self._held.values()]
                # The lease runs from when the statement reached the server, not from
                # when its answer came back (which a stalled network can delay).
                sent = time.monotonic()
                still_ours = jobs.renew(conn, self.worker_id, held, self.options.lease_s)
                self._last_renewal = sent
                with self._lock:
                    for job_id, attempt in held:
                        running = self._held.get(job_id)
                        if running is not None and running.job.attempt == attempt and job_id not in still_ours:
                            running.stop("lost")
                self._finished.wait(self.options.heartbeat_s)
            except Exception as exc:
                if isinstance(exc, psycopg.OperationalError):
                    self._connector.saw_down(exc)
                    log.warning("heartbeat: database connection lost (%s); reconnecting", _first_line(exc))
                else:
                    log.exception("heartbeat: unexpected error; starting it again")
                if conn is not None:
                    conn.close()
                conn = None
                backoff.wait(self._finished)
        if conn is not None:
            conn.close()

    def _obey(self, orders: workers.Orders) -> None:
        """Apply what an admin set in the database: a drain/stop request, node settings."""
        previous, self._orders = self._orders, orders
        if orders.requested == "stop" and previous.requested != "stop":
            self.on_event("stop requested through the database: giving running jobs back")
            self.request_stop(abort=True, reason="stop requested by an admin")
        elif orders.requested == "drain" and previous.requested is None:
            self.on_event("drain requested through the database: finishing running jobs, claiming no more")
            self.request_stop(reason="drain requested by an admin")
        if orders.active != previous.active:
            self.on_event("node set " + ("active: claiming again" if orders.active else "inactive: claiming no more jobs"))
            self._kick()

    # ------------------------------------------------------------------ jobs

    def _process(self, conn: psycopg.Connection, running: _Running) -> None:
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
                raise NodeFailure(f"cannot unpack the input in {tmp}: {exc}") from exc
            solvers.prepare(tomodir)
            before = archive.snapshot(tomodir)
            verdict = self._run_solvers(job, tomodir, running)
            if self._stopped_early(conn, running):
                return
            if verdict.ok:
                members = archive.changed_since(tomodir, before)
                result_sha = self._upload(conn, running, tomodir, members)
                if result_sha is None:
                    self._refused(job, by_database=False)
                    return
                ok = self._persist(
                    conn,
                    running,
                    lambda c: jobs.complete(
                        c,
                        job,
                        result_sha256=result_sha,
                        exit_code=verdict.exit_code,
                        actor=self.actor,
                        detail=self._provenance(running, tomodir),
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
            result_sha = self._upload(conn, running, tomodir, members) if members else None
            self._report_failure(
                conn, running, verdict.category, verdict.reason, verdict.exit_code, result_sha, tomodir
            )
        finally:
            self._discard(tmp)

    def _stopped_early(self, conn: psycopg.Connection, running: _Running) -> bool:
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

    def _persist(self, conn: psycopg.Connection, running: _Running, fn: Callable[[psycopg.Connection], T]) -> T | None:
        """Run a fenced write, riding out a database outage of any length.

        The write names the attempt, so retrying after a reconnect can never
        complete a job twice, and the database decides whether the attempt is
        still ours: the result waits on the node until it can ask.  Only the
        database saying the attempt is gone ("lost", from the heartbeat) or a
        worker told to give everything up now ends the wait; the slot's own
        connection is replaced if needed.
        """
        backoff = Backoff()
        own: psycopg.Connection | None = None
        try:
            while True:
                current = conn if not conn.closed else own
                try:
                    if current is None or current.closed:
                        current = own = self._connect("retry")
                    return fn(current)
                except psycopg.OperationalError as exc:
                    if current is not None:
                        current.close()
                    if running.why == "lost" or self._aborting.is_set():
                        return None
                    self.on_event(
                        f"job {running.job.id}: database unreachable ({_first_line(exc)}); retrying in {backoff.step:g} s"
                    )
                    backoff.wait(self._aborting)
        finally:
            if own is not None:
                own.close()

    def _upload(self, conn: psycopg.Connection, running: _Running, tomodir: Path, members: list[str]) -> str | None:
        def put(c: psycopg.Connection) -> str:
            try:
                return store.put_tree(c, self.db.store, tomodir, members=members).sha256
            except OSError as exc:
                raise NodeFailure(f"cannot pack the results: {exc}") from exc

        return self._persist(conn, running, put)

    def _unpack_input(self, conn: psycopg.Connection, job: jobs.Job, tmp: Path, tomodir: Path) -> None:
        # Typical inputs stay in memory between download and unpacking (a file
        # written, read back and removed was a tenth of a tiny job's overhead).
        with Spool(INPUT_SPOOL_BYTES, tmp, "input.tar.zst") as fh:
            size = store.fetch(conn, self.db.store, job.input_sha256, fh)
            tomodir.mkdir()
            archive.unpack(fh.source(), tomodir, limits=self.limits, size=size)

    def _run_solvers(self, job: jobs.Job, tomodir: Path, running: _Running) -> solvers.Verdict:
        timeout = job.timeout_s if job.timeout_s is not None else self.options.timeout_s
        verdict = solvers.Verdict(True)
        with open(tomodir / LOG_NAME, "wb") as log_file:
            for step in job.steps:
                solver = self.solvers[solvers.STEP_SOLVER[step]]
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
                running.elapsed += outcome.elapsed
                if outcome.returncode == -signal.SIGILL:
                    raise NodeFailure(f"{solver.path} died of SIGILL (built for another CPU?)")
                if outcome.returncode in CANNOT_EXECUTE:
                    # setpriv (and a shell wrapper) exit 126/127 when the program cannot be run here.
                    raise NodeFailure(f"{solver.path} could not be executed on this node (exit {outcome.returncode})")
                full = _scratch_full(tomodir)
                if full is not None:
                    # Checked before the verdict: outputs cut short by a full disk are neither
                    # a result nor the job's failure.
                    raise NodeFailure(full)
                verdict = solvers.judge(outcome, tomodir, timeout)
                if not verdict.ok:
                    break
        return verdict

    def _report_failure(
        self,
        conn: psycopg.Connection,
        running: _Running,
        category: str,
        reason: str,
        exit_code: int | None,
        result_sha: str | None,
        tomodir: Path | None = None,
    ) -> None:
        job = running.job
        detail = self._provenance(running, tomodir) if tomodir is not None else None
        ok = self._persist(
            conn,
            running,
            lambda c: jobs.fail(
                c,
                job,
                category=category,
                reason=reason,
                exit_code=exit_code,
                result_sha256=result_sha,
                actor=self.actor,
                detail=detail,
            ),
        )
        if ok:
            self.tally.failed += 1
            self._ended(job, JobStatus.FAILED, f"job {job.id}: failed ({category}): {reason}")
        else:
            self._refused(job, by_database=ok is False)

    def _ended(self, job: jobs.Job, status: JobStatus, message: str) -> None:
        self.on_event(message)
        self.on_job_end(job.id, status, message)

    def _provenance(self, running: _Running, tomodir: Path) -> dict[str, object]:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _scratch_full(tomodir: Path) -> str | None:
    """Why the scratch filesystem holding ``tomodir`` counts as full, or None."""
    try:
        st = os.statvfs(tomodir)
    except OSError as exc:
        return f"cannot check the free space of the scratch filesystem at {tomodir}: {exc}"
    free = st.f_bavail * st.f_frsize
    if free < SCRATCH_MIN_FREE or (st.f_files and st.f_favail == 0):
        return (
            f"the scratch filesystem at {tomodir.parent.parent} was full when the solver ended "
            f"({free} bytes, {st.f_favail} inodes free): its output may be cut short; "
            "free space there or point --workdir at a larger filesystem"
        )
    return None
