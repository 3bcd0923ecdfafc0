"""What a worker is told (options), what it holds (a running job) and counts, and its constants.

Shared by the worker's modules; nothing here touches the database or a process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from cr_queue.queries import jobs


LOG_NAME = "exe/crh_solver.log"
FAILURE_MEMBERS = ("exe/error.dat", LOG_NAME)
TMP_PREFIX = "crh-w"
EXIT_NODE_BROKEN = 3
# A worker that ends because of a bug of its own must not look like one that ended well.
EXIT_INTERNAL_ERROR = 1
# Told to give its jobs back now, the worker could not within its grace (a statement the
# database never answered): the jobs not given back come back when their leases run out.
EXIT_STUCK = 4
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
    heartbeat_s: float = 2.0  # at the most: a short lease is renewed every third of it (beat_s)
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

    @property
    def beat_s(self) -> float:
        """How often the heartbeat beats and renews: every heartbeat_s, and at least three times
        per lease, so that the watchdog's half-lease rule never trips on a worker that beats
        (--lease 3 was renewed every 2 s and gave its jobs up at each beat)."""
        return min(self.heartbeat_s, self.lease_s / 3)


@dataclass
class Running:
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
    """This node cannot run jobs (solver will not start, disk full, ...): not the job's fault.

    ``space``: the scratch filesystem was full.  That may be the job's own output, too
    large for this node, or another slot's: once the job's directory is gone the slot
    looks again (``room_again``), and only a filesystem still full without it counts
    towards a broken node (slots._node_trouble)."""

    def __init__(self, reason: str, *, space: bool = False) -> None:
        super().__init__(reason)
        self.space = space
        self.room_again = False
