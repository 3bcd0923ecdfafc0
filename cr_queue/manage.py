"""Changing jobs after they were added: cancel, requeue, priority (crh_cancel, crh requeue, crh priority).

Each change is one statement of the query layer; what it did not change is
explained here, job by job, in the words the commands print: a job that is
not in the database (or is another login's), or one whose state does not
allow the change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cr_queue.db.connection import Database
from cr_queue.queries import jobs
from cr_queue.targets import Selection


@dataclass
class Changed:
    """The jobs a change was made to, and one line for each job (or target) it was not."""

    ids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def cancel(db: Database, selection: Selection) -> Changed:
    """Cancel the selected jobs that have not ended; a running one is stopped by its worker."""
    with db.connect("crh_cancel") as conn:
        cancelled = jobs.cancel(conn, selection.ids, jobs.Actor())
        known = jobs.get_jobs(conn, selection.ids)
    result = Changed(cancelled, list(selection.problems))
    for job_id in selection.ids:
        if job_id not in cancelled:
            job = known.get(job_id)
            result.problems.append(
                _unknown(db, job_id) if job is None else f"job {job_id}: already {job.status}, nothing to cancel"
            )
    return result


def requeue(db: Database, selection: Selection | None, *, all_failed: bool = False) -> Changed:
    """Send failed or cancelled jobs to the queue again.  ``selection``: the jobs named
    (None: none named); ``all_failed``: every failed job of this user on this computer
    (of those named, if any are)."""
    actor = jobs.Actor()
    named = selection or Selection()
    with db.connect("crh_requeue") as conn:
        ids = named.ids
        if all_failed:
            mine = jobs.failed_of(conn, actor.os_user, actor.host)
            ids = [i for i in mine if selection is None or i in set(named.ids)]
        requeued = jobs.requeue(conn, ids, actor)
        known = jobs.get_jobs(conn, ids)
    result = Changed(requeued, list(named.problems))
    for job_id in ids:
        if job_id not in requeued:
            job = known.get(job_id)
            result.problems.append(
                _unknown(db, job_id)
                if job is None
                else f"job {job_id}: is {job.status}{' and already retrieved' if job.downloaded else ''}; "
                "only failed or cancelled jobs not yet retrieved can be requeued (re-add retrieved ones with crh_add)"
            )
    return result


def set_priority(db: Database, selection: Selection, priority: int) -> Changed:
    """Give the selected jobs that still wait (or run) a new priority."""
    with db.connect("crh_priority") as conn:
        changed = jobs.set_priority(conn, selection.ids, priority, jobs.Actor())
    return Changed(
        changed,
        selection.problems
        + [
            f"job {i}: not waiting or running (or not in {db.redacted}); its priority was not changed"
            for i in selection.ids
            if i not in changed
        ],
    )


def _unknown(db: Database, job_id: int) -> str:
    return f"job {job_id}: not in the database {db.redacted} (or another login's job)"
