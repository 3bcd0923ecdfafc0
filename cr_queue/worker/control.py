"""The worker's main thread and its one connection: NOTIFY, beat, claims, the rescue sweep.

An idle worker must cost the database one connection and a transaction every
few seconds (issue 16: 60 idle workers of 4 slots each did not fit in a
default server's 100 connections).  So the control connection carries
everything that is not a job's transfer: the liveness lock, LISTEN and the
wake token, the beat (which renews the leases, lease.py), the claims made for
idle slots (handed to them through a queue; a slot opens its own connection
only to fetch the input and send the result), and, on the one worker of the
fleet that holds the rescue leader lock, the rescue sweep.  Only this thread
uses the connection, so a wait for NOTIFY never holds up a claim or a beat.

Through PgBouncer in transaction pooling (``db.pooled``) session state cannot
be trusted: no LISTEN, no wake token, no locks; the worker polls, and every
worker sweeps, but only every lease_s (with jitter).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import zlib
from dataclasses import replace

import psycopg

from cr_queue.queries import jobs, session, workers
from cr_queue.worker.options import Running
from cr_queue.worker.reconnect import CONNECTION_ERRORS, Backoff, first_line as _first_line

log = logging.getLogger(__name__)

# How long the control thread waits for a notification before looking at its clocks.
TICK_S = 0.25


class ControlMixin:
    """The control-loop part of Worker (its state lives in Worker.__init__)."""

    @property
    def _pooled(self) -> bool:
        """Connections through a transaction-pooling PgBouncer: no session state to rely on."""
        return self.db.pooled

    def _main_loop(self, control: psycopg.Connection | None, slots: list[threading.Thread]) -> psycopg.Connection | None:
        # Liveness matters most: the control connection carries the beat, so it knocks
        # more often than the other threads when the database is gone.
        backoff = Backoff(cap=2.0)
        fresh = True  # the registration's connection: its session is not set up yet
        while any(t.is_alive() for t in slots):
            self._release_slots(len(slots))
            try:
                if control is None or control.closed:
                    control = self._connect("control")
                    backoff.reset()
                    fresh = True
                if fresh:
                    self._open_session(control)
                    fresh = False
                while any(t.is_alive() for t in slots):
                    self._control_conn, self._tick_started = control, time.monotonic()
                    self._tick(control, len(slots))
            except Exception as exc:
                if _connection_ended(exc, control):
                    self._connector.saw_down(exc)
                    self.on_event(f"control connection lost ({_first_line(exc)}); reconnecting in {backoff.step:g} s")
                else:
                    log.exception("control loop: unexpected error; starting it again in %g s", backoff.step)
                if control is not None:
                    control.close()
                control = None
                backoff.wait()
        return control

    def _unwedge_control(self, now: float) -> None:
        """Called by the watchdog: if the control thread has waited in one round for longer
        than the server lets its session stay silent, its connection is wedged (a proxy or
        NAT that still acknowledges: keepalives see nothing, the answer never comes; the
        fault run saw a worker wait in a claim for ever after SIGTERM).  Shut the socket
        down under it: the statement fails as a lost connection and the loop reconnects."""
        conn, started = self._control_conn, self._tick_started
        if conn is None or started is None or now - started < max(self._silent_session_limit, 10.0):
            return
        self._tick_started = None  # once per round
        try:
            fd = conn.pgconn.socket
            with socket.fromfd(fd, socket.AF_UNIX if conn.info.host.startswith("/") else socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error, ValueError):
            return
        self.on_event(f"control connection silent for {now - started:.0f} s: cut it, reconnecting")

    def _open_session(self, conn: psycopg.Connection) -> None:
        """A new session holds no lock and hears nothing: take the liveness lock, LISTEN,
        and beat, claim and (if due) sweep at once."""
        self._token = False
        self._leader = False
        self._next_beat = 0.0
        self._next_poll = 0.0
        if self._pooled:
            if not self._next_rescue:
                # Spread the fleet's sweeps over the lease (every worker sweeps through a pooler).
                self._next_rescue = time.monotonic() + random.uniform(0, self.options.lease_s)
            return
        self._next_rescue = 0.0
        # A silent session loses its locks: a leader cut off must not stop every sweep.
        session.bound_idle_session(conn, self._silent_session_limit)
        if not workers.hold_worker_lock(conn, self.worker_id):
            log.warning("worker lock %s already held by an old session", self.worker_id)
        workers.listen(conn, jobs=False)

    @property
    def _silent_session_limit(self) -> float:
        """How long the control session may stay silent before the server ends it: half a
        lease (by then the watchdog gives the solvers up anyway), and never less than two
        idle beats (a healthy idle worker speaks at least that often)."""
        return max(self.options.lease_s / 2, 2 * self._beat_interval(False) + 1)

    def _tick(self, conn: psycopg.Connection, n_slots: int) -> None:
        """One round: hear notifications, beat when due, claim for idle slots, sweep when due."""
        self._release_slots(n_slots)
        if self._pooled:
            with self._wake:
                if self._generation == self._claimed_generation and not self._stopping.is_set():
                    self._wake.wait(TICK_S)
        else:
            for note in conn.notifies(timeout=TICK_S, stop_after=1):
                self._on_notify(note)
            self._pass_token_on(conn, n_slots)
        now = time.monotonic()
        # An idle worker's beat rides with its claim poll (one transaction) when it is nearly due.
        beat_due = now >= self._next_beat
        if self._claim_due(now, n_slots):
            with self._lock:
                holding = bool(self._held)
            ride = not holding and now >= self._next_beat - self.options.poll_s / 2
            if self._claim_for_slots(conn, n_slots, beat=ride):
                beat_due = False
        if beat_due:
            with self._lock:
                holding = bool(self._held)
            self._beat(conn)
            self._next_beat = self._last_beat + self._beat_interval(holding)
        if self._rescue_due(time.monotonic()):
            swept = self._rescue(conn)
            log.debug("rescue sweep: %d job(s) returned", swept)
            self._next_rescue = time.monotonic() + self._rescue_every()
        if time.monotonic() >= self._next_tmp_sweep:
            # The job directories dead workers left on this node: every worker, no database.
            self._sweep_tmp()
            self._next_tmp_sweep = time.monotonic() + self.options.rescue_s

    # ------------------------------------------------------------------ claims

    def _claim_due(self, now: float, n_slots: int) -> bool:
        """A slot is idle and either something woke the worker (a notification, a job that
        ended, new orders) or the poll is due; never while stopping or told to be inactive."""
        if self._stopping.is_set() or not self._orders.active:
            return False
        with self._lock:
            if self._busy >= n_slots:
                return False
        with self._wake:
            kicked = self._generation != self._claimed_generation
        return kicked or now >= self._next_poll

    def _claim_for_slots(self, conn: psycopg.Connection, n_slots: int, *, beat: bool) -> bool:
        """Claim for the idle slots until they are all busy or nothing fits, and hand each job
        to a slot.  With ``beat`` (an idle worker whose beat is due) the beat and the first
        claim are one transaction: an idle worker costs one transaction per poll.  Whether
        it beat."""
        with self._wake:
            self._claimed_generation = self._generation
        self._next_poll = time.monotonic() + self.options.poll_s
        beaten = False
        first = True
        while True:
            # Under the hand-off lock: a slot ends only when the worker stops and nothing waits
            # for it, so a job claimed here is always taken by a slot (slots.py).
            with self._handoff_lock:
                if self._stopping.is_set():
                    return beaten
                with self._lock:
                    if self._busy >= n_slots:
                        return beaten
                sent = time.monotonic()
                if first:
                    # The poll's transaction: the idle beat when due, a try for the wake token
                    # when it is not held, and the claim; one transaction per poll when idle.
                    with conn.transaction():
                        if beat:
                            self._beat(conn)
                            beaten = True
                        self._take_token(conn)
                        # The beat may have brought a drain, stop or inactive order: then no claim.
                        go = not self._stopping.is_set() and self._orders.active
                        claimed = self._claim(conn) if go else None
                    if beaten:
                        self._next_beat = sent + self._beat_interval(claimed is not None)
                    first = False
                else:
                    claimed = self._claim(conn)
                if claimed is None:
                    break
                self._hand_over(*claimed, sent)
        with self._lock:
            idle_everywhere = self._busy == 0
        if self.options.quit_when_empty and idle_everywhere and not self._stopping.is_set() and self._nothing_left(conn):
            self.request_stop(reason="queue empty")
        return beaten

    def _release_slots(self, n_slots: int) -> None:
        """Once the worker stops, queue one None per slot behind the jobs claimed: each slot
        runs what was handed to it, then ends (slots.py)."""
        if not self._stopping.is_set() or self._slots_released:
            return
        with self._handoff_lock:
            self._slots_released = True
            for _ in range(n_slots):
                self._handoff.put(None)

    def _hand_over(self, job: jobs.Job, cost: int, sent: float) -> None:
        """Hold a claimed job (its lease is renewed from now on) and give it to an idle slot."""
        with self._lock:
            if not self._held:
                # The claim set the lease; nothing else was held whose renewal could be late.
                self._last_renewal = sent
            self._busy += 1
            stale = self._held.get(job.id)
            if stale is not None:
                # An earlier attempt of this very job, in a slot, is no longer ours: the worker
                # was stopped past its lease (SIGSTOP, a frozen VM), the job was rescued and
                # claimed again here.  The old slot stops; the job is the new slot's.
                stale.stop("lost")
            running = self._held[job.id] = Running(job, cpus=cost)
        # The first renewal of a held job comes within beat_s, not at the idle beat's pace.
        self._next_beat = min(self._next_beat, time.monotonic() + self.options.beat_s)
        self._handoff.put(running)

    # ------------------------------------------------------------ rescue sweep

    def _rescue_due(self, now: float) -> bool:
        """The leader sweeps every rescue_s; through a pooler every worker does, every lease_s."""
        return (self._leader or self._pooled) and now >= self._next_rescue

    def _rescue_every(self) -> float:
        if self._pooled:
            return self.options.lease_s * random.uniform(0.75, 1.25)
        return self.options.rescue_s

    def _rescue(self, conn: psycopg.Connection) -> int:
        """Return lost workers' jobs to the queue; how many came back."""
        rescued = jobs.rescue(conn, self.actor)
        for job_id, status in rescued:
            self.on_event(f"job {job_id}: its worker was lost; now {status}")
            if status == "queued":
                self._kick()
        return len(rescued)

    # ------------------------------------------------------- notifications

    def _on_notify(self, note) -> None:
        if note.channel == workers.CANCEL_CHANNEL:
            with self._lock:
                running = self._held.get(int(note.payload or 0))
            if running is not None:
                self.on_event(f"job {running.job.id}: cancelled by its owner; stopping the solver")
                running.stop("cancelled")
        elif note.channel == workers.CONTROL_CHANNEL:
            # "<worker id> <request>" from `crh worker drain|stop`: heard now, not at the next beat.
            head, _, request = (note.payload or "").partition(" ")
            if head.isdigit() and int(head) == self.worker_id and request in ("drain", "stop"):
                self.on_event(f"{request} request heard on {workers.CONTROL_CHANNEL}")
                self._obey(replace(self._orders, requested=request))
        elif self._serves_group(note.payload):
            self._kick()

    def _take_token(self, conn: psycopg.Connection) -> None:
        """Try for the wake token (and LISTEN for new jobs) with the claim poll, which only an
        idle slot makes: then a new job wakes one worker, not every idle one
        (workers.take_wake_token).  Tried once per poll, not at every tick: 60 idle workers
        trying 4 times a second were most of an idle fleet's transactions."""
        if self._pooled or self._token:
            return
        if workers.take_wake_token(conn, self._token_key):
            self._token = True
            self._kick()  # a job may have come while nobody was listening

    def _pass_token_on(self, conn: psycopg.Connection, n_slots: int) -> None:
        """Pass the wake token on as soon as no slot is idle (or the worker stops)."""
        if not self._token:
            return
        with self._lock:
            idle = self._busy < n_slots and not self._stopping.is_set()
        if not idle:
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

    def _kick(self, *, one: bool = False) -> None:
        """Something changed (a notification, a job ended, new orders): the control loop claims
        for the idle slots at its next tick instead of waiting for the poll.  (``one`` is kept
        for callers; claims are made one at a time by the control loop anyway.)"""
        with self._wake:
            self._generation += 1
            self._wake.notify_all()


def _connection_ended(exc: Exception, conn: psycopg.Connection | None) -> bool:
    """Whether an error means the control connection is gone: a lost connection, or the
    server ending the session (the poll's transaction held open past the idle limit by a
    frozen network path is a 25P03 error, not an OperationalError; the fault run saw it)."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return conn is not None and conn.closed
