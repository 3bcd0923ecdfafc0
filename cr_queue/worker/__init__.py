"""The worker daemon: claims jobs, runs the solvers, sends results back.

Threads and connections, and why:

* the main thread owns the *control connection*, the only one an idle worker
  holds (a fleet must fit in the server's max_connections): it holds the
  advisory lock that says "this worker is alive", LISTENs (new jobs, cancels,
  an admin's orders), beats and renews the leases of the jobs held in one
  statement (every beat_s while it holds jobs, with the claim poll when idle),
  claims for idle slots and hands the jobs over, and, on the one worker of the
  fleet holding the rescue leader lock, runs the rescue sweep;
* one *slot* thread per concurrent job opens a connection only while its job's
  input or result is in transit, so a slow upload in one job never delays
  another and a running solver holds no connection;
* the *watchdog* thread never touches the database: drain timeout, max
  runtime, and a lease that could not be renewed for half its length.

No transaction stays open while a solver runs: every statement is short.
Losing the database is survivable: every connection reconnects with backoff,
solvers keep running, and a result is uploaded once the database is back, as
long as the attempt is still this worker's (the database decides: fencing).

Where each part lives: daemon.py (the Worker, its life and signals),
control.py (the main thread), lease.py (the beat and the watchdog), slots.py
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
