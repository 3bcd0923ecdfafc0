"""Many tomodirs registered at once: threads, the packers' deliveries, batched commits in the order found.

Each tomodir goes through registration.py's steps; what this module adds is
who does them: the parent's threads (each on its own connection, so one
compresses while another waits for a commit), the helper processes that
packers.py forked (their archives stored whole, in batches, or streamed),
and the main thread, which makes finished uploads claimable in the order the
tomodirs were found.  The measurements behind every number are in
docs/performance.md.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path

from cr_queue import directory_locks
from cr_queue import packers
from cr_queue import store
from cr_queue.add import AddOptions, AddReport
from cr_queue.db.connection import Database
from cr_queue.job_states import JobStatus
from cr_queue.queries import jobs, session
from cr_queue.registration import add_one, interrupted, lock_tomodirs, new_job, register_each, skipping_duplicates, stored
from cr_queue.tomodir import archive
from cr_queue.tomodir import control
from cr_queue.tomodir import discover
from cr_queue.util import forks
from cr_queue.util.pause import pause_point


def register_all(
    db: Database, todo: list[discover.Tomodir], options: AddOptions, report: AddReport, progress, helpers: packers.Packers | None
) -> AddReport:
    """Register every tomodir of ``todo`` into ``report``: in threads (:func:`_add_parallel`) when
    there is more than one or helper processes pack them, else as registration.py does one."""
    actor = jobs.Actor()
    # Held until every job of this run is queued: a second crh_add on the same
    # tree leaves these tomodirs to this one (and a killed run's locks go with its connection).
    locks = db.connect(directory_locks.connection_name("crh_add", actor))
    try:
        busy = lock_tomodirs(locks, todo, actor)
        pause_point(PAUSE_LOCKED)
        try:
            if helpers is not None or (
                len(todo) - len(busy) > 1 and ADD_THREADS > 1 and os.environ.get("CRH_PAUSE_AT", PAUSE_QUEUING) in PARALLEL_PAUSES
            ):
                return _add_parallel(db, todo, options, actor, report, progress, helpers, busy)
            report.skipped.extend((todo[i].path.resolve(), reason) for i, reason in busy.items())
            return register_each(db, [td for i, td in enumerate(todo) if i not in busy], options, actor, report, progress)
        except KeyboardInterrupt:
            # Ctrl-C: say what is queued and what the next crh_add resumes, rather than "Aborted!".
            interrupted(locks, todo, busy, actor, report)
            return report
    finally:
        locks.close()


def resumable(db: Database, todo: list[discover.Tomodir]) -> dict[Path, int]:
    """For a dry run: the tomodirs whose .crh names a job still 'registering' (a rerun
    resumes it rather than skipping it), each with its job id."""
    controls = {}
    for td in todo:
        crh = control.control_path(td.path.resolve())
        try:
            controls[td.path.resolve()] = control.read(crh).job_id
        except control.ControlFileError:
            continue
    if not controls:
        return {}
    conn = db.connect("crh_add")
    try:
        found = jobs.get_jobs(conn, list(controls.values()))
    finally:
        conn.close()
    return {
        path: job_id
        for path, job_id in controls.items()
        if job_id in found and found[job_id].status == JobStatus.REGISTERING
    }


# A pause point (CRH_PAUSE_AT, see pause.py) that keeps the threads: it stops
# where uploads are done and their jobs not yet claimable, for the Ctrl-C test.
PAUSE_QUEUING = "add:queuing"
# Also kept with the threads: the run holds its tomodirs' locks, nothing is registered yet.
PAUSE_LOCKED = "add:locked"
PARALLEL_PAUSES = (PAUSE_QUEUING, PAUSE_LOCKED)


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
    db: Database, todo, options: AddOptions, actor: jobs.Actor, report: AddReport, progress, helpers: packers.Packers | None,
    busy: dict[int, str],
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

    # Looked at again now that this run holds their locks: another crh_add may have
    # registered some since they were found (they then go the way of those with a .crh).
    fresh_indices = [i for i in packers.unregistered(todo, options.force) if i not in busy]
    fresh = {todo[i].path for i in fresh_indices}
    others = forks.Indices(i for i in range(len(todo)) if todo[i].path not in fresh and i not in busy)
    new_work = helpers.work if helpers is not None else forks.Indices(fresh_indices)
    futures: list[Future] = [Future() for _ in todo]
    for i, reason in busy.items():
        futures[i].set_result((None, [], [], [(todo[i].path.resolve(), reason)]))
    ids: Future[dict[Path, int]] = Future()
    stop = threading.Event()

    def one(index: int, put=None):
        """Everything of one tomodir but making it claimable; its report entries travel with it."""
        td = todo[index]
        deferred: list[tuple[int, str]] = []
        own = AddReport()
        item = add_one(
            conn_of(), db.store, td, options, actor, own,
            finish=lambda _c, job_id, sha, _a: deferred.append((job_id, sha)),
            registered=(lambda: ids.result()[td.path]) if td.path in fresh else None,
            put=put,
        )
        return item, deferred, own.problems, own.skipped

    def one_stored(index: int, path: Path, job_id: int, packed: archive.PackResult, duplicate: int | None):
        """:func:`one` for a tomodir whose archive :func:`store_batch` stored."""
        deferred: list[tuple[int, str]] = []
        own = AddReport()
        item = skipping_duplicates(path, own, lambda: stored(
            conn_of(), todo[index], path, control.control_path(path), job_id, packed, actor, own,
            duplicate=duplicate, finish=lambda _c, job, sha, _a: deferred.append((job, sha)),
        ))
        return item, deferred, own.problems, own.skipped

    inbox = packers.Inbox(len(helpers.helpers) if helpers is not None else 0)

    def from_helper(delivery: packers.Delivery) -> None:
        """Register a tomodir whose archive a helper packed, storing what it sent."""
        _fulfil(futures[delivery.index], functools.partial(one, delivery.index, functools.partial(_put_delivered, db.store, delivery)))

    def store_batch(batch: list[packers.Delivery]) -> None:
        """Register tomodirs whose archives a helper sent whole: stored together, their
        duplicates looked up together, then each one's .crh and report."""
        try:
            unsettled = [d for d in batch if not futures[d.index].done()]
            for d in [d for d in unsettled if todo[d.index].path not in fresh]:
                # Registered by another crh_add since it was packed: skipped as add_one says.
                _fulfil(futures[d.index], functools.partial(one, d.index))
                unsettled.remove(d)
            if not unsettled:
                return
            conn = conn_of()
            try:
                paths = {d.index: todo[d.index].path.resolve() for d in unsettled}
                store.put_many(conn, db.store, [d.packed() for d in unsettled])
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
                _fulfil(futures[d.index], functools.partial(one_stored, d.index, paths[d.index], job_id, d.result, duplicates[job_id]))
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
                _fulfil(futures[index], functools.partial(one, index))
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

    # Opened before any thread starts: a database that went away since the locks
    # were taken is then one clear message (the fault run saw a traceback here).
    main = db.connect("crh_add")
    try:
        try:
            for thread in threads:
                thread.start()
            watcher = threading.Thread(target=finally_unsettled, name="crh_add-watch", daemon=True)
            watcher.start()
            try:
                _register_all(main, [td for td in todo if td.path in fresh], options, actor, ids)
                session.synchronous_commit(main, False)
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
            session.durable_commit(main)
        finally:
            main.close()
    finally:
        stop.set()
        inbox.close()
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join()
        for conn in conns:
            conn.close()
    return report


def _put_delivered(where: store.Store, delivery: packers.Delivery, conn) -> archive.PackResult:
    return store.put_stream(conn, where, delivery.write_to)


def _fulfil(future: Future, fn: Callable[[], object]) -> None:
    """Run ``fn`` for a future that nobody has settled yet, and settle it."""
    if future.done():
        return
    try:
        outcome = fn()
    except BaseException as exc:  # handed to whoever reads the future
        _fail(future, exc)
    else:
        with _FULFILLING:
            if not future.done():
                future.set_result(outcome)


def _fail(future: Future, error: BaseException) -> None:
    with _FULFILLING:
        if not future.done():
            future.set_exception(error)


_FULFILLING = threading.Lock()


def _register_all(main, fresh: list[discover.Tomodir], options: AddOptions, actor: jobs.Actor, ids: Future) -> None:
    """The job rows of every tomodir without a .crh, in one (durable) commit; then every
    thread that waits for its job id gets it."""
    news = [new_job(td, td.path.resolve(), control.control_path(td.path.resolve()), options, actor) for td in fresh]
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
    waiting: list = []  # the items of ``ready``: reported once their jobs are claimable
    since = 0.0

    def make_claimable() -> None:
        if ready:
            pause_point(PAUSE_QUEUING)
            jobs.finish_registrations(main, ready, actor)
        for item in waiting:
            report.added.append(item)
            if progress is not None:
                progress(item)
        ready.clear()
        waiting.clear()

    for future in futures:
        if ready and not future.done():
            left = since + QUEUE_DELAY_S - time.monotonic()
            if len(ready) >= QUEUE_BATCH or left <= 0 or not wait([future], timeout=left).done:
                make_claimable()
        item, deferred, problems, skipped = future.result()
        if deferred and not ready:
            since = time.monotonic()
        ready.extend(deferred)
        report.problems.extend(problems)
        report.skipped.extend(skipped)
        if item is not None:
            waiting.append(item)
    make_claimable()


# Jobs made claimable by one statement.  A statement per job that happened to be
# ready cost 1 ms of server time each (46 statements for 101 jobs); a worker
# waits at most QUEUE_DELAY_S longer for the first job of a batch.
QUEUE_BATCH = 32
QUEUE_DELAY_S = 0.1
