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

import functools
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cr_queue import packers
from cr_queue.tomodir import archive
from cr_queue.tomodir import control
from cr_queue.tomodir import discover
from cr_queue.util import forks
from cr_queue.queries import jobs
from cr_queue import store
from cr_queue.db.connection import Database
from cr_queue.util.pause import pause_point


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
    helpers: packers.Packers | None = None,
) -> AddReport:
    """Register the tomodirs below ``paths``.  ``helpers``: what :func:`packers.start`
    forked for the same ``found.todo`` and ``options.force`` (the caller closes it)."""
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
    actor = jobs.Actor()
    if helpers is not None or (len(found.todo) > 1 and ADD_THREADS > 1 and not os.environ.get("CRH_PAUSE_AT")):
        return _add_parallel(db, list(found.todo), options, actor, report, progress, helpers)
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
# Beside helper processes (packers.py), the parent's own threads.
THREADS_WITH_HELPERS = 2
# A helper's archive up to this size is read whole and stored by whichever parent
# thread is free; a larger one is streamed into the store as it arrives.
DELIVERY_IN_MEMORY = 8 << 20
# Archives read whole that one parent thread stores together (store.put_many): as
# many as have arrived, up to this.  Measured: five round trips for a batch instead
# of six per archive halves the client's and the server's work per archive.
STORE_BATCH = 16


def _add_parallel(
    db: Database, todo, options: AddOptions, actor: jobs.Actor, report: AddReport, progress, helpers: packers.Packers | None
) -> AddReport:
    """Like the loop in :func:`add`, but packing and uploading in threads, and in
    helper processes (``helpers``, see packers.py) where there are any.

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

    fresh_indices = helpers.indices if helpers is not None else packers.unregistered(todo, options.force)
    fresh = {todo[i].path for i in fresh_indices}
    others = forks.Indices(i for i in range(len(todo)) if todo[i].path not in fresh)
    new_work = helpers.work if helpers is not None else forks.Indices(fresh_indices)
    futures: list[Future] = [Future() for _ in todo]
    ids: Future[dict[Path, int]] = Future()
    stop = threading.Event()

    def one(index: int, put=None):
        """Everything of one tomodir but making it claimable; its report entries travel with it."""
        td = todo[index]
        deferred: list[tuple[int, str]] = []
        own = AddReport()
        item = _add_one(
            conn_of(), td, options, actor, own,
            finish=lambda _c, job_id, sha, _a: deferred.append((job_id, sha)),
            registered=(lambda: ids.result()[td.path]) if td.path in fresh else None,
            put=put,
        )
        return item, deferred, own.problems, own.skipped

    def one_stored(index: int, path: Path, job_id: int, packed: archive.PackResult, duplicate: int | None):
        """:func:`one` for a tomodir whose archive :func:`store_batch` stored."""
        deferred: list[tuple[int, str]] = []
        own = AddReport()
        item = _skipping_duplicates(path, own, lambda: _stored(
            conn_of(), todo[index], path, control.control_path(path), job_id, packed, actor, own,
            duplicate=duplicate, finish=lambda _c, job, sha, _a: deferred.append((job, sha)),
        ))
        return item, deferred, own.problems, own.skipped

    inbox = packers.Inbox(len(helpers.helpers) if helpers is not None else 0)

    def from_helper(delivery: packers.Delivery) -> None:
        """Register a tomodir whose archive a helper packed, storing what it sent."""
        _settle(futures[delivery.index], functools.partial(one, delivery.index, functools.partial(_put_delivered, delivery)))

    def store_batch(batch: list[packers.Delivery]) -> None:
        """Register tomodirs whose archives a helper sent whole: stored together, their
        duplicates looked up together, then each one's .crh and report."""
        try:
            unsettled = [d for d in batch if not futures[d.index].done()]
            if not unsettled:
                return
            conn = conn_of()
            try:
                paths = {d.index: todo[d.index].path.resolve() for d in unsettled}
                store.put_many(conn, [d.packed() for d in unsettled])
                job_ids = {d.index: ids.result()[todo[d.index].path] for d in unsettled}
                duplicates = jobs.find_duplicates(
                    conn, actor.host, [(job_ids[d.index], str(paths[d.index]), d.result.sha256) for d in unsettled]
                )
            except BaseException as exc:  # handed to whoever reads the futures
                for d in unsettled:
                    _fail(futures[d.index], exc)
                return
            for d in unsettled:
                job_id = job_ids[d.index]
                _settle(futures[d.index], functools.partial(one_stored, d.index, paths[d.index], job_id, d.result, duplicates[job_id]))
        finally:
            inbox.done(batch)

    def work() -> None:
        """A parent thread: what the helpers packed first (it is ready and holds memory),
        then tomodirs that need the database first, then new ones as they come."""
        while not stop.is_set():
            batch = inbox.take(STORE_BATCH, wait=False)
            if batch:
                store_batch(batch)
                continue
            index = others.take()
            if index is None:
                index = new_work.take()
            if index is not None:
                _settle(futures[index], functools.partial(one, index))
                continue
            batch = inbox.take(STORE_BATCH, wait=True)
            if not batch:
                return
            store_batch(batch)

    def receive(helper: packers.Helper) -> None:
        """Read what one helper packed as it arrives: a small archive whole, for any
        thread to store; a large one is streamed into the store here."""
        try:
            for delivery in helper.deliveries():
                try:
                    whole = delivery.read(DELIVERY_IN_MEMORY)
                except BaseException as exc:  # the helper could not pack it
                    _fail(futures[delivery.index], exc)
                    continue
                if whole:
                    inbox.put(delivery)
                else:
                    from_helper(delivery)
            error = helper.lost()
        except BaseException as exc:  # the pipe broke: what it still owed fails
            error = exc
        finally:
            inbox.sender_finished()
        if error is not None:
            for index in list(helper.outstanding):
                _fail(futures[index], error)

    threads = [
        threading.Thread(target=work, name=f"crh_add-{n}")
        for n in range(THREADS_WITH_HELPERS if helpers is not None and helpers.helpers else ADD_THREADS)
    ]
    threads += [threading.Thread(target=receive, args=(h,), name="crh_add-receive") for h in (helpers.helpers if helpers else [])]

    def finally_unsettled() -> None:
        """Once nobody works any more, a tomodir still without an outcome was lost with a helper."""
        for thread in threads:
            thread.join()
        for future in futures:
            _fail(future, packers.HelperDied("a helper process of this command ended before it reported a tomodir"))

    try:
        main = db.connect("crh_add")
        try:
            for thread in threads:
                thread.start()
            watcher = threading.Thread(target=finally_unsettled, name="crh_add-watch", daemon=True)
            watcher.start()
            try:
                _register_all(main, [td for td in todo if td.path in fresh], options, actor, ids)
                main.execute("SET synchronous_commit = off")
                _queue_in_order(main, futures, actor, report, progress)
            except BaseException:
                stop.set()
                inbox.close()
                if helpers is not None:
                    helpers.kill()
                raise
            finally:
                watcher.join()
            # Make every registration durable before saying so.
            main.execute("SET synchronous_commit = on")
            main.execute("SELECT txid_current()")
        finally:
            main.close()
    finally:
        stop.set()
        inbox.close()
        for thread in threads:
            thread.join()
        for conn in conns:
            conn.close()
    return report


def _put_delivered(delivery: packers.Delivery, conn) -> archive.PackResult:
    return store.put_stream(conn, delivery.write_to)


def _settle(future: Future, fn: Callable[[], object]) -> None:
    """Run ``fn`` for a future that nobody has settled yet, and settle it."""
    if future.done():
        return
    try:
        outcome = fn()
    except BaseException as exc:  # handed to whoever reads the future
        _fail(future, exc)
    else:
        with _SETTLING:
            if not future.done():
                future.set_result(outcome)


def _fail(future: Future, error: BaseException) -> None:
    with _SETTLING:
        if not future.done():
            future.set_exception(error)


_SETTLING = threading.Lock()


def _register_all(main, fresh: list[discover.Tomodir], options: AddOptions, actor: jobs.Actor, ids: Future) -> None:
    """The job rows of every tomodir without a .crh, in one (durable) commit; then every
    thread that waits for its job id gets it."""
    news = [_new_job(td, td.path.resolve(), control.control_path(td.path.resolve()), options, actor) for td in fresh]
    try:
        registered = dict(zip((td.path for td in fresh), jobs.begin_registrations(main, news, actor)))
    except BaseException as exc:
        ids.set_exception(exc)
        raise
    ids.set_result(registered)


def _queue_in_order(main, futures: list[Future], actor: jobs.Actor, report: AddReport, progress) -> None:
    """Collect each tomodir's outcome in the order found, making finished uploads claimable
    in batches: one statement for what is ready once the next outcome keeps us waiting,
    and there are QUEUE_BATCH of them or the first has waited QUEUE_DELAY_S."""
    ready: list[tuple[int, str]] = []
    since = 0.0
    for future in futures:
        if ready and not future.done():
            left = since + QUEUE_DELAY_S - time.monotonic()
            if len(ready) >= QUEUE_BATCH or left <= 0 or not wait([future], timeout=left).done:
                jobs.finish_registrations(main, ready, actor)
                ready.clear()
        item, deferred, problems, skipped = future.result()
        if deferred and not ready:
            since = time.monotonic()
        ready.extend(deferred)
        report.problems.extend(problems)
        report.skipped.extend(skipped)
        if item is not None:
            report.added.append(item)
            if progress is not None:
                progress(item)
    jobs.finish_registrations(main, ready, actor)


# Jobs made claimable by one statement.  A statement per job that happened to be
# ready cost 1 ms of server time each (46 statements for 101 jobs); a worker
# waits at most QUEUE_DELAY_S longer for the first job of a batch.
QUEUE_BATCH = 32
QUEUE_DELAY_S = 0.1


def _add_one(
    conn,
    td: discover.Tomodir,
    options: AddOptions,
    actor: jobs.Actor,
    report: AddReport,
    finish=None,
    registered: Callable[[], int] | None = None,
    put: Callable | None = None,
) -> Added | None:
    """``registered``: the job row is made elsewhere (by :func:`jobs.begin_registrations`);
    ``put(conn)``: stores the archive packed elsewhere (by a helper process)."""
    path = td.path.resolve()
    crh = control.control_path(path)
    if registered is not None:
        return _register_reporting(conn, td, path, crh, options, actor, report, registered=registered, finish=finish, put=put)
    if crh.exists() and not options.force:
        try:
            existing = control.read(crh)
        except control.ControlFileError as exc:
            report.problems.append(str(exc))
            return None
        job = jobs.get_job(conn, existing.job_id)
        if job is not None and job.status == "registering":
            return _register_reporting(conn, td, path, crh, options, actor, report, resume_id=job.id, finish=finish)
        state = job.status if job is not None else "unknown to this database"
        report.skipped.append((path, f"already registered as job {existing.job_id} ({state}); --force registers it again"))
        return None
    return _register_reporting(conn, td, path, crh, options, actor, report, finish=finish)


def _register_reporting(conn, td, path, crh, options, actor, report, *, resume_id=None, registered=None, finish=None, put=None) -> Added | None:
    return _skipping_duplicates(
        path, report, lambda: _register(conn, td, path, crh, options, actor, report, resume_id=resume_id, registered=registered, finish=finish, put=put)
    )


def _skipping_duplicates(path: Path, report: AddReport, register: Callable[[], Added]) -> Added | None:
    try:
        return register()
    except Duplicate as dup:
        report.skipped.append((path, f"the same content is already queued or running as job {dup.job_id}"))
        return None


def _register(
    conn,
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
    packed (default: pack ``path`` here)."""
    job_id: int | None = resume_id
    if job_id is None and registered is None:
        job_id = jobs.begin_registration(conn, _new_job(td, path, crh, options, actor), actor)
    pause_point("add:registered")
    packed = put(conn) if put is not None else store.put_tree(conn, path)
    pause_point("add:uploaded")
    if job_id is None:
        job_id = registered()
    duplicate = jobs.find_duplicate(conn, actor.host, str(path), packed.sha256, job_id)
    return _stored(conn, td, path, crh, job_id, packed, actor, report, duplicate=duplicate, finish=finish, resumed=resume_id is not None)


def _stored(
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
            f"{path / rel}: a symlink pointing outside the tomodir was not sent with job {job_id}; "
            "replace it with the file it points to if the solver needs it, then crh_add --force"
        )
    return Added(path, job_id, td.sim_type, td.steps, packed.size, resumed=resumed)


def _new_job(td: discover.Tomodir, path: Path, crh: Path | None, options: AddOptions, actor: jobs.Actor) -> jobs.NewJob:
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


def register_unlinked(conn, td: discover.Tomodir, options: AddOptions, actor: jobs.Actor) -> Added:
    """Register a tomodir that lives only for the upload (no .crh beside it)."""
    report = AddReport()
    added = _register(conn, td, td.path.resolve(), None, options, actor, report)
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
