"""The Worker: its life from registration to the last report, its threads, its signals.

The work itself is in the mixins: control.py (main thread: the control
connection, beats, claims, the rescue sweep), lease.py (the beat and the
watchdog), slots.py, pipeline.py, scratch.py; reconnect.py opens every
connection.  An idle worker holds one connection, the control connection.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue as _queue
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psycopg

from cr_queue import __version__
from cr_queue.tomodir import archive
from cr_queue.queries import jobs, workers
from cr_queue.solvers import reaper, solvers
from cr_queue.db.connection import Database
from cr_queue.worker.reconnect import Backoff, Connector, first_line as _first_line
from cr_queue.util.pause import pause_point
from cr_queue.worker.options import EXIT_INTERNAL_ERROR, EXIT_STUCK, Running, Tally, WorkerOptions
from cr_queue.worker.scratch import ScratchMixin, ScratchWatch
from cr_queue.worker.lease import LeaseMixin
from cr_queue.worker.control import ControlMixin
from cr_queue.worker.slots import SlotsMixin
from cr_queue.worker.pipeline import PipelineMixin

log = logging.getLogger(__name__)

T = TypeVar("T")

# A pause point (CRH_PAUSE_AT, util/pause.py): the control connection is open, nothing registered yet.
PAUSE_CONNECTED = "worker:connected"
# How long a worker told to give its jobs back now (a second SIGTERM, a node found broken, an
# admin's stop) may take before it exits anyway; systemd's default stop timeout is 90 s.
ABORT_GRACE_S = 20.0


class Worker(ControlMixin, LeaseMixin, SlotsMixin, PipelineMixin, ScratchMixin):
    """A worker daemon: claims jobs, runs the solvers, sends results back."""

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
        self._scratch_watch = ScratchWatch(self.workdir)
        self._stopping = threading.Event()
        # Set when running jobs are to be given up now: nobody waits for the database any more.
        self._aborting = threading.Event()
        self._connector = Connector(db, self.name, self._idle_transaction_limit)
        self._finished = threading.Event()
        # Set when run() returns: the abort deadline (_exit_if_stuck) has nothing to do.
        self._exited = threading.Event()
        # Jobs whose last write was abandoned when told to give everything up (no answer):
        # still this worker's in the database until their leases run out.
        self._not_given_back: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._generation = 0
        self._trash: _queue.SimpleQueue[Path | None] | None = None
        self._token = False
        # Whether this session holds the rescue leader lock (control.py): then it sweeps for the fleet.
        self._leader = False
        # Jobs the control loop claimed, waiting for a slot; claims and slot ends are serialised on the lock.
        self._handoff: _queue.SimpleQueue[Running | None] = _queue.SimpleQueue()
        self._handoff_lock = threading.Lock()
        self._slots_released = False
        self._claimed_generation = -1
        self._next_poll = 0.0
        self._next_beat = 0.0
        self._next_rescue = 0.0
        self._next_tmp_sweep = 0.0
        # The control thread's connection and when its current round began (the watchdog
        # cuts a connection wedged in one round: control.py _unwedge_control).
        self._control_conn: psycopg.Connection | None = None
        self._tick_started: float | None = None
        # Dead workers' job directories already given to the cleanup thread (scratch.py).
        self._swept: set[str] = set()
        self._last_beat = time.monotonic()
        self._trash_thread: threading.Thread | None = None
        self._busy = 0
        self._node_failures = 0
        # Jobs given back after a node failure: job id -> when (time.monotonic()).
        self._gave_back: dict[int, float] = {}
        self._held: dict[int, Running] = {}
        self._claim_lock = threading.Lock()
        self._cpus_used = 0
        self._orders = workers.Orders()
        self._orders_lock = threading.Lock()
        self._last_renewal = time.monotonic()
        self._drain_deadline: float | None = None
        self._started = time.monotonic()
        self.worker_id: int | None = None
        self.actor = jobs.Actor()
        # Which binaries computed the results: recorded with every outcome.
        self._solver_info = {name: s.describe() for name, s in self.solvers.items()}

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self._exited.set()

    def _run(self) -> int:
        control = self._register()
        if control is None:
            self.on_event(f"worker {self.name} stopped ({self.stop_reason}) before it could register")
            return self.exit_code
        self.on_event(
            f"worker {self.name} (id {self.worker_id}) started: {self.options.jobs} job(s) at a time, "
            f"{self.options.threads} thread(s) each, solvers: "
            + ", ".join(f"{solvers.DISPLAY[n]}={s.path}" for n, s in sorted(self.solvers.items()))
        )
        self._sweep_tmp()
        # A solver's detached descendants come back to this process, to be ended with its step.
        reaper.become_subreaper()
        threading.Thread(target=self._guarded, args=(self._watchdog,), name="watchdog", daemon=True).start()
        threading.Thread(target=self._exit_if_stuck, name="abort-deadline", daemon=True).start()
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
            self._release_slots(len(slots))
            for t in slots:
                t.join()
            self._finished.set()
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

    def _register(self) -> psycopg.Connection | None:
        """Register this worker and beat once; the control connection, or None if told to
        stop first.

        The command has already reached the database (its schema check), so the
        URL and the login are right: a connection lost now is an outage that
        began as the worker started (the fault run saw workers exit 2 so, and a
        SLURM pilot has nobody to restart it).  It is ridden out like any
        other: backoff, jitter, cap, for as long as it takes."""
        backoff = Backoff()
        while not self._stopping.is_set():
            control = None
            try:
                control = self._connect("control")
                pause_point(PAUSE_CONNECTED)
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
                self._obey(workers.beat(control, self.worker_id, draining=False).orders)
                return control
            except psycopg.OperationalError as exc:
                if control is not None:
                    control.close()
                self.on_event(
                    f"database unreachable while starting ({_first_line(exc)}); retrying in {backoff.step:g} s"
                )
                backoff.wait(self._stopping)
        return None

    def request_stop(self, *, abort: bool = False, reason: str | None = None) -> None:
        """Stop claiming and let running jobs finish; with abort, give them back at once."""
        if reason and not self._stopping.is_set():
            self.stop_reason = reason
        self._stopping.set()
        if self._drain_deadline is None and self.options.drain_timeout_s is not None:
            self._drain_deadline = time.monotonic() + self.options.drain_timeout_s
        if abort:
            # The watchdog stops the running solvers within a tick, and _exit_if_stuck (waiting
            # since the start) bounds what follows: this may run in the signal handler, which
            # must not wait for a lock the interrupted main thread holds, nor start a thread.
            self._aborting.set()
        self._kick()

    def _exit_if_stuck(self) -> None:
        """Told to give everything up now, the worker is gone within ABORT_GRACE_S, whatever it waits for
        (a thread of its own from the start, waiting for the abort).

        After the solvers are stopped nothing waits for the database any more (_persist gives
        up at the first error), but a statement can hang on a connection whose other end never
        answers (the CI fault run saw a worker wait so for ever after its second SIGTERM).  Its
        jobs then come back when their leases run out; the stacks show where it was waiting.
        """
        self._aborting.wait()
        if self._exited.wait(ABORT_GRACE_S):
            return
        # Not waiting for the lock for ever: a thread stuck while holding it is what we end.
        locked = self._lock.acquire(timeout=1.0)
        try:
            held = sorted({r.job.id for r in list(self._held.values())} | self._not_given_back)
        finally:
            if locked:
                self._lock.release()
        message = (
            f"still not stopped {ABORT_GRACE_S:g} s after being told to give its jobs back (waiting for the "
            f"database to answer); exiting now: the jobs not given back ({', '.join(map(str, held)) or 'none'}) "
            "come back to the queue when their leases run out"
        )
        self.on_event(message)
        log.error("%s; where each thread was waiting:", message)
        faulthandler.dump_traceback(all_threads=True)
        logging.shutdown()
        os._exit(EXIT_STUCK)

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
        # `kill -USR1 PID`: every thread's stack on stderr (the journal), the worker goes
        # on.  What an admin (or the fault run) needs to see where a worker that will
        # not stop is waiting.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def _stop_all(self, why: str) -> None:
        with self._lock:
            for running in self._held.values():
                running.stop(why)

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
