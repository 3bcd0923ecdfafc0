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

Where each part lives: daemon.py (the Worker, its life and signals),
control.py (the main thread), lease.py (heartbeat and watchdog), slots.py
(claiming, and what an error means), pipeline.py (one job from input to
result), scratch.py (job directories), reconnect.py (every connection, with
backoff), options.py (options, counters, constants).
"""

from __future__ import annotations

from cr_queue.worker.daemon import Worker
from cr_queue.worker.options import (
    EXIT_INTERNAL_ERROR,
    EXIT_NODE_BROKEN,
    LOG_NAME,
    TMP_PREFIX,
    NodeFailure,
    Tally,
    WorkerOptions,
)

__all__ = [
    "EXIT_INTERNAL_ERROR",
    "EXIT_NODE_BROKEN",
    "LOG_NAME",
    "TMP_PREFIX",
    "NodeFailure",
    "Tally",
    "Worker",
    "WorkerOptions",
]
