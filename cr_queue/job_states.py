"""The states of a job: the one list of them in Python.

    registering -> queued -> running -> finished | failed | cancelled

A job is ``registering`` while crh_add stores its input (no worker can see
it), ``queued`` until a worker claims it, ``running`` while a worker holds
it, and then ends.  Retrieval is not a state: a retrieved job stays
``finished`` (or ``failed``) with its ``downloaded`` flag set, so cr_hydra's
admin queries keep counting it.

Why a module of its own, at the bottom of the tree (beside config.py, in the
helpers' layer): every layer names states (the schema's CHECK constraint in
db/schema.py, the query layer's wrappers, the services, the CLI), and a
module may only import the layers below it.  It imports nothing, so
``crh status`` reads the states without importing SQLAlchemy (schema.py),
whose import was a third of a command's start-up.

The statements in ``cr_queue/queries/*.sql`` write states as SQL literals (a
statement reads whole, as an admin would type it); tests/test_layers.py
checks that each literal, and each state the live database's CHECK
constraint allows, is a :class:`JobStatus`.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's ``status`` column; compares equal to the plain string the database returns."""

    REGISTERING = "registering"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Not ended yet: a worker may still run it, so it cannot be retrieved.
PENDING: tuple[JobStatus, ...] = (JobStatus.REGISTERING, JobStatus.QUEUED, JobStatus.RUNNING)
# Ended: nothing happens to the job any more unless someone requeues it.
ENDED: tuple[JobStatus, ...] = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)
# Ended with something to bring back: the results, or exe/error.dat and the solver's log.
RETRIEVABLE: tuple[JobStatus, ...] = (JobStatus.FINISHED, JobStatus.FAILED)
