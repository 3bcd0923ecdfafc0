"""One tomodir's registration, in the order that makes a crash at any point harmless:

1. the job row is created as 'registering' (no worker can see it);
2. the tomodir is packed and streamed into the store in one pass;
3. the ``.crh`` file is written atomically beside the tomodir;
4. the job becomes 'queued' (and a NOTIFY wakes the workers).

Interrupted before 3, the next crh_add finds the 'registering' row of the same
directory and takes it over; interrupted between 3 and 4, it finds the .crh of
a 'registering' job and completes it.  Nothing is ever claimable half-made,
and the user's directory is only read, never changed (the .crh is a sibling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from cr_queue import directory_locks
from cr_queue import store
from cr_queue.add import Added, AddOptions, AddReport
from cr_queue.db.connection import Database
from cr_queue.job_states import JobStatus
from cr_queue.queries import jobs
from cr_queue.tomodir import archive
from cr_queue.tomodir import control
from cr_queue.tomodir import discover
from cr_queue.util.pause import pause_point


class Duplicate(Exception):
    """The same directory with the same content is already waiting or running."""

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def lock_tomodirs(conn, todo: Sequence[discover.Tomodir], actor: jobs.Actor) -> dict[int, str]:
    """Lock the directories holding the tomodirs of ``todo`` for this crh_add (directory_locks.py);
    the indices of the tomodirs in a directory another crh_add holds, each with why it is
    skipped.  The temporary .crh files a killed run left beside the others go."""
    paths = [td.path.resolve() for td in todo]
    holders = directory_locks.take(conn, "crh_add", actor.host, paths)
    control.remove_leftovers([path for path, who in zip(paths, holders) if who is None])
    return {
        i: f"another {who} is registering the tomodirs in {paths[i].parent} at this moment; this one is left "
        "to it (run crh_add again once it has ended if it did not take this one)"
        for i, who in enumerate(holders)
        if who is not None
    }


def interrupted(conn, todo: Sequence[discover.Tomodir], busy: dict[int, str], actor: jobs.Actor, report: AddReport) -> None:
    """After Ctrl-C: record in ``report`` which tomodirs this run left 'registering' and how
    many it never began (``conn``: an idle connection, this run's locks)."""
    report.interrupted = True
    done = {item.path for item in report.added} | {path for path, _ in report.skipped}
    left = [td.path.resolve() for i, td in enumerate(todo) if i not in busy and td.path.resolve() not in done]
    registering = jobs.registering_at(conn, actor.host, [str(p) for p in left])
    report.left_registering = [(p, registering[str(p)]) for p in left if str(p) in registering]
    report.not_begun = len(left) - len(report.left_registering)


def register_each(
    db: Database, todo: list[discover.Tomodir], options: AddOptions, actor: jobs.Actor, report: AddReport, progress
) -> AddReport:
    """Register the tomodirs one after the other on one connection, into ``report``."""
    conn = db.connect("crh_add")
    try:
        for td in todo:
            item = add_one(conn, db.store, td, options, actor, report)
            if item is not None:
                report.added.append(item)
                if progress is not None:
                    progress(item)
    finally:
        conn.close()
    return report


def add_one(
    conn,
    where: store.Store,
    td: discover.Tomodir,
    options: AddOptions,
    actor: jobs.Actor,
    report: AddReport,
    finish=None,
    registered: Callable[[], int] | None = None,
    put: Callable | None = None,
) -> Added | None:
    """``where``: the installation's store (``Database.store``); ``registered``: the job row
    is made elsewhere (by :func:`jobs.begin_registrations`); ``put(conn)``: stores the
    archive packed elsewhere (by a helper process)."""
    path = td.path.resolve()
    crh = control.control_path(path)
    if registered is not None:
        return _register_reporting(conn, where, td, path, crh, options, actor, report, registered=registered, finish=finish, put=put)
    if crh.exists() and not options.force:
        try:
            existing = control.read(crh)
        except control.ControlFileError as exc:
            report.problems.append(str(exc))
            return None
        job = jobs.get_job(conn, existing.job_id)
        if job is not None and job.status == JobStatus.REGISTERING:
            return _register_reporting(conn, where, td, path, crh, options, actor, report, resume_id=job.id, finish=finish)
        state = job.status if job is not None else "unknown to this database"
        report.skipped.append((path, f"already registered as job {existing.job_id} ({state}); --force registers it again"))
        return None
    return _register_reporting(conn, where, td, path, crh, options, actor, report, finish=finish)


def _register_reporting(conn, where, td, path, crh, options, actor, report, *, resume_id=None, registered=None, finish=None, put=None) -> Added | None:
    return skipping_duplicates(
        path, report, lambda: _register(conn, where, td, path, crh, options, actor, report, resume_id=resume_id, registered=registered, finish=finish, put=put)
    )


def skipping_duplicates(path: Path, report: AddReport, attempt: Callable[[], Added]) -> Added | None:
    """``attempt()``, or None with the tomodir reported as skipped when its content is already queued."""
    try:
        return attempt()
    except Duplicate as dup:
        report.skipped.append((path, f"the same content is already queued or running as job {dup.job_id}"))
        return None


def _register(
    conn,
    where: store.Store,
    td: discover.Tomodir,
    path: Path,
    crh: Path | None,
    options: AddOptions,
    actor: jobs.Actor,
    report: AddReport,
    *,
    resume_id: int | None = None,
    registered: Callable[[], int] | None = None,
    finish=None,
    put: Callable | None = None,
) -> Added:
    """Register one tomodir; without ``crh`` (the Python API's in-memory jobs) no .crh is written.

    ``registered()`` gives the id of a job row made elsewhere (crh_add with
    threads makes them all at once, while the threads already pack: the
    archive needs no job).  ``finish(conn, job_id, sha256, actor)`` makes
    the job claimable (default: at once); crh_add with threads defers it to
    keep the queue order.  ``put(conn)`` stores an archive a helper process
    packed (default: pack ``path`` here, into the store ``where``)."""
    job_id: int | None = resume_id
    if job_id is None and registered is None:
        job_id = jobs.begin_registration(conn, new_job(td, path, crh, options, actor), actor)
    pause_point("add:registered")
    packed = put(conn) if put is not None else store.put_tree(conn, where, path)
    pause_point("add:uploaded")
    if job_id is None:
        job_id = registered()
    duplicate = jobs.find_duplicate(conn, actor.host, str(path), packed.sha256, job_id)
    return stored(conn, td, path, crh, job_id, packed, actor, report, duplicate=duplicate, finish=finish, resumed=resume_id is not None)


def stored(
    conn, td: discover.Tomodir, path: Path, crh: Path | None, job_id: int, packed: archive.PackResult,
    actor: jobs.Actor, report: AddReport, *, duplicate: int | None, finish=None, resumed: bool = False,
) -> Added:
    """The rest of a registration once the archive is stored and ``duplicate`` looked up."""
    if duplicate is not None:
        jobs.drop_registration(conn, job_id)
        raise Duplicate(duplicate)
    if crh is not None:
        _write_control(crh, job_id, td, path, actor, packed.sha256, packed.manifest)
    pause_point("add:control_written")
    (finish or jobs.finish_registration)(conn, job_id, packed.sha256, actor)
    for rel in packed.skipped:
        report.problems.append(
            f"{path / rel}: {control.special_kind(path / rel)} was not sent with job {job_id}; "
            "replace it with the file it stands for if the solver needs it, then crh_add --force"
        )
    return Added(path, job_id, td.sim_type, td.steps, packed.size, resumed=resumed)


def new_job(td: discover.Tomodir, path: Path, crh: Path | None, options: AddOptions, actor: jobs.Actor) -> jobs.NewJob:
    return jobs.NewJob(
        sim_type=td.sim_type,
        model_first=td.needs_mod and td.needs_inv,
        source_path=str(path),
        crh_file=str(crh) if crh is not None else "",
        username=actor.os_user,
        source_computer=actor.host,
        priority=options.priority,
        job_group=options.group,
        threads=options.threads,
        timeout_s=options.timeout_s,
        max_attempts=options.max_attempts,
        sipdir=str(sipdir) if (sipdir := discover.sipdir_of(path)) else None,
    )


def register_unlinked(conn, where: store.Store, td: discover.Tomodir, options: AddOptions, actor: jobs.Actor) -> Added:
    """Register a tomodir that lives only for the upload (no .crh beside it)."""
    report = AddReport()
    added = _register(conn, where, td, td.path.resolve(), None, options, actor, report)
    if report.problems:
        raise ValueError("; ".join(report.problems))
    return added


def _write_control(crh: Path, job_id: int, td: discover.Tomodir, path: Path, actor: jobs.Actor, sha256: str, manifest) -> None:
    control.write(
        control.ControlFile(
            job_id=job_id,
            sim_type=td.sim_type,
            crh_file=str(crh),
            tomodir=str(path),
            source_computer=actor.host,
            username=actor.os_user,
            datetime_init=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            archive_sha256=sha256,
            manifest={rel: list(stat) for rel, stat in manifest.items()},
        ),
        crh,
    )
