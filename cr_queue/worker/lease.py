"""Lease and heartbeat: the worker says it is alive, keeps its jobs, and notices when it cannot.

The beat is sent by the control loop (control.py) on the control connection,
which also holds the liveness lock: one statement that beats, renews the
leases of the jobs held (every beat_s while there are any) and tries the
rescue leader lock, so an idle worker costs one connection and a transaction
every few seconds.  The watchdog thread never waits for the database: it
stops solvers whose leases could not be renewed for half a lease (unless the
server is known to be down, when nobody can take them), and enforces the
drain timeout and the max runtime.
"""

from __future__ import annotations

import logging
import time

import psycopg

from cr_queue.queries import workers
from cr_queue.worker.reconnect import CAP_S

log = logging.getLogger(__name__)

# An idle worker beats at most this seldom: liveness is its lock, the beat keeps
# last_heartbeat fresh for crh_status and lets another worker take the rescue leader lock.
IDLE_BEAT_MAX_S = 10.0


class LeaseMixin:
    """The lease-and-heartbeat part of Worker (its state lives in Worker.__init__)."""

    def _beat_interval(self, holding: bool) -> float:
        """Every beat_s while jobs are held (their leases); an idle worker beats with its
        claim poll (control.py sends both in one transaction), at most IDLE_BEAT_MAX_S apart."""
        if holding or self._stopping.is_set():
            return self.options.beat_s
        return max(self.options.beat_s, min(self.options.poll_s, IDLE_BEAT_MAX_S))

    def _beat(self, conn: psycopg.Connection) -> None:
        """Beat, renew the held leases and (on a direct connection, when not yet the leader) try
        the rescue leader lock, in one statement; stop the solvers of jobs no longer ours."""
        with self._lock:
            held = [(r.job.id, r.job.attempt) for r in self._held.values()]
        # The lease runs from when the statement reached the server, not from
        # when its answer came back (which a stalled network can delay).
        sent = time.monotonic()
        lead = not self._pooled and not self._leader
        result = workers.beat(
            conn,
            self.worker_id,
            draining=self._stopping.is_set(),
            held=held,
            lease_s=self.options.lease_s,
            lead=lead,
        )
        self._last_renewal = sent
        self._last_beat = sent
        if result.leader:
            self._leader = True
            log.debug("took the rescue leader lock")
            self.on_event(f"worker {self.name} now sweeps for lost workers' jobs (rescue leader)")
        self._obey(result.orders)
        if result.kept is not None:
            with self._lock:
                for job_id, attempt in held:
                    running = self._held.get(job_id)
                    if running is not None and running.job.attempt == attempt and job_id not in result.kept:
                        running.stop("lost")

    def _obey(self, orders: workers.Orders) -> None:
        """Apply what an admin set in the database: a drain/stop request, node settings."""
        # Both the heartbeat and a NOTIFY on the control channel bring orders: one at a time.
        with self._orders_lock:
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

    def _watchdog(self) -> None:
        """Watch the clock from a thread that never waits for the database.

        Any statement can hang on a half-open connection (a wedged proxy or NAT
        still acknowledges, so keepalives see nothing); the main thread may be
        stuck in one, yet the half-lease rule, the drain timeout and the max
        runtime must still stop the solvers on time.
        """
        while not self._finished.wait(0.25):
            self._watch_clock()
            self._unwedge_control(time.monotonic())

    def _watch_clock(self) -> None:
        if self._aborting.is_set():
            # Everything is to be given back now (request_stop with abort).
            self._stop_all("release")
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
