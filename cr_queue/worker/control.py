"""The worker's main thread: NOTIFY, the wake token and the rescue sweep.

New jobs wake one idle slot, a cancel stops its running solver, and the rescue
sweep returns lost workers' jobs to the queue every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import replace

import psycopg

from cr_queue.queries import jobs, workers
from cr_queue.worker.reconnect import Backoff, first_line as _first_line

log = logging.getLogger(__name__)


class ControlMixin:
    """The control-loop part of Worker (its state lives in Worker.__init__)."""

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
        elif note.channel == workers.CONTROL_CHANNEL:
            # "<worker id> <request>" from `crh worker drain|stop`: heard now, not at the next beat.
            head, _, request = (note.payload or "").partition(" ")
            if head.isdigit() and int(head) == self.worker_id and request in ("drain", "stop"):
                self.on_event(f"{request} request heard on {workers.CONTROL_CHANNEL}")
                self._obey(replace(self._orders, requested=request))
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
