"""Registering tomodirs: the crh_add workflow.

Order of a registration, chosen so that a crash at any point is harmless:

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

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import control, discover, forked, queue, store
from .db import Database
from .pause import pause_point


class Duplicate(Exception):
    """The same directory with the same content is already waiting or running."""

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id)
        self.job_id = job_id


@dataclass(frozen=True)
class AddOptions:
    force: bool = False
    dry_run: bool = False
    priority: int = 0
    group: str | None = None
    threads: int = 1
    timeout_s: int | None = None
    max_attempts: int = 3
    # Processes sharing the packing (forked after the imports: see forked.py).
    # crh_add's own process asks for more; a program using the Python API keeps
    # one, because forking a process that runs other threads is not safe.
    processes: int = 1


@dataclass
class Added:
    path: Path
    job_id: int | None
    sim_type: str
    steps: tuple[str, ...]
    size: int = 0
    resumed: bool = False


@dataclass
class AddReport:
    added: list[Added] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    done: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def plan(paths: Iterable[Path]) -> discover.Discovery:
    return discover.discover([Path(p) for p in paths])


def add(
    db: Database,
    paths: Iterable[Path],
    options: AddOptions,
    *,
    progress: Callable[[Added], None] | None = None,
    found: discover.Discovery | None = None,
) -> AddReport:
    found = found if found is not None else plan(paths)
    report = AddReport(done=list(found.done))
    report.problems.extend(found.errors)
    report.problems.extend(inc.message for inc in found.incomplete)
    if options.dry_run:
        for td in found.todo:
            crh = control.control_path(td.path)
            if crh.exists() and not options.force:
                report.skipped.append((td.path, f"{crh.name} exists: already registered"))
            else:
                report.added.append(Added(td.path.resolve(), None, td.sim_type, td.steps))
        return report
    actor = queue.Actor()
    if len(found.todo) > 1 and ADD_THREADS > 1 and not os.environ.get("CRH_PAUSE_AT"):
        return _add_parallel(db, list(found.todo), options, actor, report, progress)
    conn = db.connect("crh_add")
    try:
        for td in found.todo:
            item = _add_one(conn, td, options, actor, report)
            if item is not None:
                report.added.append(item)
                if progress is not None:
                    progress(item)
    finally:
        conn.close()
    return report


# Tomodirs packed and uploaded at the same time, each thread on its own connection:
# while one waits for the database (a commit's WAL flush), the other compresses
# (zstd releases the GIL).  Measured (bench/tune.py, docs/performance.md): 3 beat 2 and 1.
ADD_THREADS = 3
# With more than one process, the threads of each; and the least work that is
# worth a process of its own.
THREADS_PER_PROCESS = 2
MIN_TOMODIRS_PER_PROCESS = 4


def default_processes() -> int:
    """Processes for a crh_add command: one per CPU, at most four."""
    return max(1, min(os.cpu_count() or 1, 4))


def _add_parallel(db: Database, todo, options: AddOptions, actor: queue.Actor, report: AddReport, progress) -> AddReport:
    """Like the loop in :func:`add`, but packing and uploading in threads, and
    in ``options.processes`` processes where there is enough to share.

    The job rows of all new tomodirs are made first, in one durable commit
    (while the threads already pack: an archive needs no job).  The last step
    of each registration (making the job claimable) is done here, in the
    order of ``todo`` and in batches of whatever uploads have finished, so
    the jobs of one crh_add are queued in the order they were found, as
    without threads.  Those commits do not wait for the disk: an interrupted
    run leaves 'registering' jobs whose .crh the next crh_add completes (or,
    without a .crh yet, whose rows it takes over); the last one waits, which
    makes every earlier one durable too (PostgreSQL's log is sequential).
    """
    local = threading.local()
    conns: list = []
    lock = threading.Lock()

    def conn_of():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = db.connect("crh_add")
            with lock:
                conns.append(conn)
        return conn

    def close_conns() -> None:
        for conn in conns:
            conn.close()

    fresh = {td.path for td in todo if options.force or not control.control_path(td.path.resolve()).exists()}

    def one(td: discover.Tomodir, registered_ids: Callable[[], dict[Path, int]]):
        """Everything of one tomodir but making it claimable; its report entries travel with it."""
        deferred: list[tuple[int, str]] = []
        own = AddReport()
        item = _add_one(
            conn_of(), td, options, actor, own,
            finish=lambda _c, job_id, sha, _a: deferred.append((job_id, sha)),
            registered=(lambda: registered_ids()[td.path]) if td.path in fresh else None,
        )
        return item, deferred, own.problems, own.skipped

    processes = max(1, min(options.processes, len(todo) // MIN_TOMODIRS_PER_PROCESS))
    numbered = list(enumerate(todo))
    shares = [numbered[n::processes] for n in range(processes)]
    # Children first: forked before this process has threads or connections of its own.
    children = [forked.Child(share, one, threads=THREADS_PER_PROCESS, teardown=close_conns) for share in shares[1:]]
    futures: dict[int, Future] = {}
    for child in children:
        futures.update(child.futures)
    ids: Future[dict[Path, int]] = Future()
    try:
        main = db.connect("crh_add")
        try:
            with ThreadPoolExecutor(THREADS_PER_PROCESS if children else ADD_THREADS, thread_name_prefix="crh_add") as pool:
                for index, td in shares[0]:
                    futures[index] = pool.submit(one, td, ids.result)
                try:
                    _register_all(main, [td for td in todo if td.path in fresh], options, actor, ids, children)
                    main.execute("SET synchronous_commit = off")
                    _queue_in_order(main, [futures[i] for i in range(len(todo))], actor, report, progress)
                except BaseException:
                    for future in futures.values():
                        future.cancel()
                    for child in children:
                        child.kill()
                    raise
            # Make every registration durable before saying so.
            main.execute("SET synchronous_commit = on")
            main.execute("SELECT txid_current()")
        finally:
            main.close()
            close_conns()
    finally:
        for child in children:
            child.close()
    return report


def _register_all(main, fresh: list[discover.Tomodir], options: AddOptions, actor: queue.Actor, ids: Future, children) -> None:
    """The job rows of every tomodir without a .crh, in one (durable) commit; then every
    thread and child that waits for its job id gets it."""
    news = [_new_job(td, td.path.resolve(), control.control_path(td.path.resolve()), options, actor) for td in fresh]
    try:
        registered = dict(zip((td.path for td in fresh), queue.begin_registrations(main, news, actor)))
    except BaseException as exc:
        ids.set_exception(exc)
        raise
    ids.set_result(registered)
    for child in children:
        child.send(registered)


def _queue_in_order(main, futures: list[Future], actor: queue.Actor, report: AddReport, progress) -> None:
    """Collect each tomodir's outcome in the order found, making finished uploads claimable
    in batches (one statement for all that are ready while the others still pack)."""
    ready: list[tuple[int, str]] = []
    for future in futures:
        if ready and not future.done():
            queue.finish_registrations(main, ready, actor)
            ready.clear()
        item, deferred, problems, skipped = future.result()
        ready.extend(deferred)
        report.problems.extend(problems)
        report.skipped.extend(skipped)
        if item is not None:
            report.added.append(item)
            if progress is not None:
                progress(item)
    queue.finish_registrations(main, ready, actor)


def _add_one(
    conn,
    td: discover.Tomodir,
    options: AddOptions,
    actor: queue.Actor,
    report: AddReport,
    finish=None,
    registered: Callable[[], int] | None = None,
) -> Added | None:
    """``registered``: the job row is made elsewhere (by :func:`queue.begin_registrations`)."""
    path = td.path.resolve()
    crh = control.control_path(path)
    if registered is not None:
        return _register_reporting(conn, td, path, crh, options, actor, report, registered=registered, finish=finish)
    if crh.exists() and not options.force:
        try:
            existing = control.read(crh)
        except control.ControlFileError as exc:
            report.problems.append(str(exc))
            return None
        job = queue.get_job(conn, existing.job_id)
        if job is not None and job.status == "registering":
            return _register_reporting(conn, td, path, crh, options, actor, report, resume_id=job.id, finish=finish)
        state = job.status if job is not None else "unknown to this database"
        report.skipped.append((path, f"already registered as job {existing.job_id} ({state}); --force registers it again"))
        return None
    return _register_reporting(conn, td, path, crh, options, actor, report, finish=finish)


def _register_reporting(conn, td, path, crh, options, actor, report, *, resume_id=None, registered=None, finish=None) -> Added | None:
    try:
        return _register(conn, td, path, crh, options, actor, report, resume_id=resume_id, registered=registered, finish=finish)
    except Duplicate as dup:
        report.skipped.append((path, f"the same content is already queued or running as job {dup.job_id}"))
        return None


def _register(
    conn,
    td: discover.Tomodir,
    path: Path,
    crh: Path | None,
    options: AddOptions,
    actor: queue.Actor,
    report: AddReport,
    *,
    resume_id: int | None = None,
    registered: Callable[[], int] | None = None,
    finish=None,
) -> Added:
    """Register one tomodir; without ``crh`` (the Python API's in-memory jobs) no .crh is written.

    ``registered()`` gives the id of a job row made elsewhere (crh_add with
    threads makes them all at once, while the threads already pack: the
    archive needs no job).  ``finish(conn, job_id, sha256, actor)`` makes
    the job claimable (default: at once); crh_add with threads defers it to
    keep the queue order."""
    job_id: int | None = resume_id
    if job_id is None and registered is None:
        job_id = queue.begin_registration(conn, _new_job(td, path, crh, options, actor), actor)
    pause_point("add:registered")
    packed = store.put_tree(conn, path)
    pause_point("add:uploaded")
    if job_id is None:
        job_id = registered()
    duplicate = queue.find_duplicate(conn, actor.host, str(path), packed.sha256, job_id)
    if duplicate is not None:
        queue.drop_registration(conn, job_id)
        raise Duplicate(duplicate)
    if crh is not None:
        _write_control(crh, job_id, td, path, actor, packed.sha256, packed.manifest)
    pause_point("add:control_written")
    (finish or queue.finish_registration)(conn, job_id, packed.sha256, actor)
    for rel in packed.skipped:
        report.problems.append(
            f"{path / rel}: a symlink pointing outside the tomodir was not sent with job {job_id}; "
            "replace it with the file it points to if the solver needs it, then crh_add --force"
        )
    return Added(path, job_id, td.sim_type, td.steps, packed.size, resumed=resume_id is not None)


def _new_job(td: discover.Tomodir, path: Path, crh: Path | None, options: AddOptions, actor: queue.Actor) -> queue.NewJob:
    return queue.NewJob(
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


def register_unlinked(conn, td: discover.Tomodir, options: AddOptions, actor: queue.Actor) -> Added:
    """Register a tomodir that lives only for the upload (no .crh beside it)."""
    report = AddReport()
    added = _register(conn, td, td.path.resolve(), None, options, actor, report)
    if report.problems:
        raise ValueError("; ".join(report.problems))
    return added


def _write_control(crh: Path, job_id: int, td: discover.Tomodir, path: Path, actor: queue.Actor, sha256: str, manifest) -> None:
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
