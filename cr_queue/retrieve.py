"""Bringing results back into the user's tree: the crh_retrieve workflow.

A result is downloaded (into memory, or a hidden file beside the tomodir when
large) and its sha256 checked before anything is unpacked.  The retrieved
tomodir is then assembled beside the original: a hard-link copy of it (the
user's files keep their inodes), into which the result is unpacked member by
member, each file under a temporary name renamed into place.  The copy is
exchanged with the original in one atomic step, so an interrupted retrieval
leaves the tomodir either untouched or complete; the ``.crh`` goes last, and
a rerun finishes whatever was left.  Where the filesystem cannot exchange
directories, the result is unpacked into a staging directory and moved in
file by file instead (each move atomic; a rerun completes an interrupted one).

A file the user changed after crh_add (its size or modification time differs
from the manifest in the ``.crh``), or a symlink, is never overwritten: the
result is put beside it as ``NAME.crh-result`` and the report says so.
"""

from __future__ import annotations

import functools
import os
import queue as _queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cr_queue import directory_locks
from cr_queue import retrieve_helper
from cr_queue.tomodir import archive
from cr_queue.tomodir import control
from cr_queue.util import forks
from cr_queue.job_states import PENDING, JobStatus
from cr_queue.queries import jobs
from cr_queue import store
from cr_queue.tomodir import placement, swap
from cr_queue.db.connection import Database
from cr_queue.util.imports import command_process
from cr_queue.util.pause import pause_point
from cr_queue.util.spool import Spool
from cr_queue.tomodir import disk_full

# Beside a file the user changed: the result (tomodir/placement.py).
CONFLICT_SUFFIX = placement.CONFLICT_SUFFIX
# Left inside a retrieved tomodir between the exchange and the end, so a rerun knows.
MARKER_PREFIX = ".crh-retrieved-"
# Results up to this size are held in memory between download and unpacking.
SPOOL_BYTES = 16 << 20


@dataclass
class Item:
    path: Path
    job_id: int
    status: str
    reason: str | None = None
    files: int = 0
    conflicts: list[str] = field(default_factory=list)


@dataclass
class RetrieveReport:
    """What a retrieval did with each tomodir below the paths, and what it could not do."""

    retrieved: list[Item] = field(default_factory=list)
    failed: list[Item] = field(default_factory=list)
    pending: list[Item] = field(default_factory=list)
    cancelled: list[Item] = field(default_factory=list)
    # Brought back by another crh_retrieve at the same time: (item, what to say).
    elsewhere: list[tuple[Item, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.problems) else 0

    def merge(self, other: RetrieveReport) -> None:
        self.retrieved += other.retrieved
        self.failed += other.failed
        self.cancelled += other.cancelled
        self.problems += other.problems
        self.elsewhere = other.elsewhere
        self.pending = other.pending


def retrieve(
    db: Database,
    paths: Iterable[Path],
    *,
    limits: archive.Limits,
    progress: Callable[[Item], None] | None = None,
    processes: int | None = None,
) -> RetrieveReport:
    """Bring back every finished job whose ``.crh`` is below ``paths``.

    ``limits``: the caps on unpacking a result (config.archive_limits).
    ``processes``: how many processes may share the work; more than one only
    in a console script's own process, which may fork (see retrieve_helper.py),
    and that is the default there."""
    if processes is None:
        processes = retrieve_helper.default_processes() if command_process() else 1
    report = RetrieveReport()
    found = control.gather([Path(p) for p in paths])
    report.problems.extend(found.problems)
    controls = found.readable
    if not controls:
        return report
    conn = db.connect("crh_retrieve")
    actor = jobs.Actor()
    # Held until the end: a second crh_retrieve leaves these tomodirs to this one
    # (and a killed run's locks go with its connection).
    locks = db.connect(directory_locks.connection_name("crh_retrieve", actor))
    try:
        work = _claim(locks, _sort_out(conn, db, controls, report, progress), report, actor.host)
        sink = _Report(report, progress)
        shared = False
        if retrieve_helper.wanted(len(work), processes):
            conn.close()  # a forked helper must not inherit a live connection
            runner = functools.partial(_Runner, limits=limits)
            shared = retrieve_helper.share(db, work, sink, runner, threads=RETRIEVE_THREADS)
            if not shared:
                conn = db.connect("crh_retrieve")
        if work and not shared:
            threads = 1 if len(work) == 1 or os.environ.get("CRH_PAUSE_AT") else RETRIEVE_THREADS
            _Runner(db, conn, work, forks.Indices(range(len(work))).take, threads, sink, limits=limits).run()
    finally:
        conn.close()
        locks.close()
    order = {w.tomodir: i for i, w in enumerate(work)}
    for items in (report.retrieved, report.failed):
        items.sort(key=lambda item: order.get(item.path, -1))
    return report


def count(paths: Iterable[Path]) -> int:
    """The ``.crh`` files below ``paths``: how long a progress bar is (0 where they cannot be searched)."""
    try:
        return len(control.find([Path(p) for p in paths]))
    except control.ControlFileError:
        return 0


@dataclass
class Work:
    """One tomodir to bring back, as its ``.crh`` and the database describe it."""

    job: jobs.Job
    cf: control.ControlFile
    crh: Path
    tomodir: Path
    item: Item
    blob: store.BlobRow | None  # the result's row from store.look_up, if it has one


def _sort_out(conn, db: Database, controls, report: RetrieveReport, progress) -> list[Work]:
    """The tomodirs to bring back; the others go into the report (pending, cancelled, unknown)."""
    by_id = jobs.get_jobs(conn, [cf.job_id for _, cf in controls])
    blobs = store.look_up(conn, [job.result_sha256 for job in by_id.values() if job.result_sha256])
    work: list[Work] = []
    for crh, cf in controls:
        tomodir = crh.with_suffix("")
        job = by_id.get(cf.job_id)
        if job is None:
            report.problems.append(
                f"{crh}: job {cf.job_id} is not in the database {db.redacted}, or belongs to another "
                "database login (each login sees only its own jobs). Retrieve with the database and "
                "login it was added with (--db or CRH_DATABASE_URL); "
                f"if that database is gone, delete {crh.name} and run crh_add again."
            )
            continue
        item = Item(tomodir, job.id, job.status, job.failure_reason)
        if job.status in PENDING:
            report.pending.append(item)
            continue
        if job.status == JobStatus.CANCELLED:
            control.remove(crh)
            report.cancelled.append(item)
            if progress is not None:
                progress(item)
            continue
        if job.status == JobStatus.FINISHED and job.result_sha256 is None:
            # Never "0 files": a finish without its result is a fault (the database refuses it
            # since migration 0005), and the .crh stays so nothing is lost.
            report.problems.append(
                f"{crh}: job {job.id} is marked finished but the database {db.redacted} has no result for it; "
                f"nothing was changed and {crh.name} is kept. Ask the admin to look at it (crh show {job.id})."
            )
            continue
        work.append(Work(job, cf, crh, tomodir, item, blobs.get(job.result_sha256 or "")))
    return work


def _claim(locks, work: list[Work], report: RetrieveReport, host: str) -> list[Work]:
    """The tomodirs of ``work`` this run brings back: their directories locked (directory_locks.py)
    and each ``.crh`` still there; those another crh_retrieve has or had go into ``report.elsewhere``."""
    holders = directory_locks.take(locks, "crh_retrieve", host, [w.tomodir for w in work])
    mine: list[Work] = []
    for w, who in zip(work, holders):
        if who is not None:
            report.elsewhere.append(
                (w.item, f"another {who} is bringing back the tomodirs in {Path(os.path.abspath(w.tomodir)).parent}: "
                 f"{w.tomodir} is left to it (run crh_retrieve again once it has ended if its .crh is still there)")
            )
        elif not w.crh.exists():
            report.elsewhere.append((w.item, f"{w.tomodir} was brought back by another crh_retrieve meanwhile"))
        else:
            mine.append(w)
    return mine


class _Report:
    """Where a recorded tomodir or a problem goes in the process that reports (see retrieve_helper.Sink)."""

    def __init__(self, report: RetrieveReport, progress: Callable[[Item], None] | None) -> None:
        self._report = report
        self._progress = progress

    def item(self, index: int, item: Item) -> None:
        (self._report.retrieved if item.status == JobStatus.FINISHED else self._report.failed).append(item)
        if self._progress is not None:
            self._progress(item)

    def problem(self, index: int, text: str) -> None:
        self._report.problems.append(text)


# Tomodirs brought back at the same time by one process (and as many again by
# its helper, if it has one), each thread on its own connection: a retrieval
# is mostly file-system calls and a commit, which release the GIL.  Measured
# in docs/performance.md.
RETRIEVE_THREADS = 3


# Jobs flagged 'downloaded' in one statement.  Until its flag is committed a
# tomodir keeps its .crh and its retrieval marker, so a rerun after a crash
# finds it complete (the marker) and only flags it.
RECORD_BATCH = 64
# While threads are still bringing tomodirs back, the main thread records what
# is done at most this often (and so often the progress output moves): it
# recorded nearly every tomodir on its own before, 90 commits and as many
# thread switches for 101 tomodirs, now 5.
RECORD_EVERY_S = 0.5


class _Runner:
    """One process's share of the work: threads bring back the tomodirs they
    take (each on its own connection), and the calling thread records them
    (flags them downloaded, drops marker and ``.crh``) and hands each to the
    sink.  Events from elsewhere (a helper process's reports) come through
    :meth:`post` and are handed to ``foreign`` on the calling thread."""

    def __init__(
        self,
        db: Database,
        conn,
        work: list[Work],
        take: Callable[[], int | None],
        threads: int,
        sink,
        *,
        limits: archive.Limits,
        foreign: Callable[[tuple], None] | None = None,
        sources: int = 0,
        application_name: str = "crh_retrieve",
    ) -> None:
        self._db = db
        self._application_name = application_name
        self._limits = limits
        self._conn = conn
        self._work = work
        self._take = take
        self._threads = threads
        self._sink = sink
        self._foreign = foreign
        self._sources = sources  # besides the threads: each posts ("end",) once
        self._events: _queue.SimpleQueue[tuple] = _queue.SimpleQueue()
        self._done: list[int] = []
        self._stop = False
        self._actor = jobs.Actor()

    def post(self, event: tuple) -> None:
        self._events.put(event)

    def run(self) -> None:
        if self._threads <= 1 and not self._sources:
            # One at a time in this thread: one tomodir, or a pause point that must be reached in order.
            while (index := self._take()) is not None:
                self._finished(index, _retrieve_one(self._conn, self._db.store, self._work[index], self._limits))
                if len(self._done) >= RECORD_BATCH:
                    self._record_retrieved()
            self._record_retrieved()
            return
        threads = [threading.Thread(target=self._bring_back, name="crh_retrieve", daemon=True) for _ in range(self._threads)]
        for thread in threads:
            thread.start()
        try:
            self._loop(len(threads) + self._sources)
        finally:
            self._stop = True
            for thread in threads:
                thread.join()

    def _loop(self, sources: int) -> None:
        recorded_at = time.monotonic()
        while sources:
            wait = RECORD_EVERY_S - (time.monotonic() - recorded_at) if self._done else None
            try:
                event = self._events.get(timeout=max(wait, 0.0)) if wait is not None else self._events.get()
            except _queue.Empty:
                event = ("record",)
            kind = event[0]
            if kind == "done":
                self._finished(event[1], event[2])
            elif kind == "end":
                sources -= 1
            elif kind == "error":
                raise event[1]
            elif kind != "record" and self._foreign is not None:
                self._foreign(event)
            if self._done and (len(self._done) >= RECORD_BATCH or time.monotonic() - recorded_at >= RECORD_EVERY_S):
                self._record_retrieved()
                recorded_at = time.monotonic()
        self._record_retrieved()

    def _bring_back(self) -> None:
        conn = None
        try:
            conn = self._db.connect(self._application_name)
            while not self._stop and (index := self._take()) is not None:
                self._events.put(("done", index, _retrieve_one(conn, self._db.store, self._work[index], self._limits)))
        except BaseException as exc:  # noqa: BLE001 - raised again by the settling thread
            self._events.put(("error", exc))
        finally:
            if conn is not None:
                conn.close()
            self._events.put(("end",))

    def _finished(self, index: int, problem: str | None) -> None:
        if problem is not None:
            self._sink.problem(index, problem)
        else:
            self._done.append(index)

    def _record_retrieved(self) -> None:
        """Flag a batch of brought-back jobs downloaded (one commit), then drop their markers and .crh files."""
        if not self._done:
            return
        done = [self._work[i] for i in self._done]
        jobs.mark_downloaded_many(self._conn, [w.item.job_id for w in done], self._actor)
        for index, w in zip(self._done, done):
            _finish(w.tomodir, w.item.job_id)
            control.remove(w.crh)
            self._sink.item(index, w.item)
        self._done.clear()


def _retrieve_one(conn, where: store.Store, w: Work, limits: archive.Limits) -> str | None:
    """Bring one job's result into its tomodir; a problem to report, or None."""
    try:
        _bring_back(conn, where, w, limits)
    except (archive.ArchiveError, store.BlobMissing) as exc:
        return f"{w.crh}: job {w.job.id}'s result cannot be used: {exc}"
    except disk_full.DiskFull as full:
        # A full disk is this tomodir's trouble, not the run's: what was
        # begun beside it goes, and the other tomodirs are brought back.
        _drop_beside(w)
        return full.message(w.tomodir, w.job.id)
    return None


def _drop_beside(w: Work) -> None:
    """Remove what an unfinished retrieval put beside the tomodir (before its exchange)."""
    parent, name, job_id = w.tomodir.parent, w.tomodir.name, w.job.id
    if not (w.tomodir / f"{MARKER_PREFIX}{job_id}").exists():
        _remove_tree(parent / f".{name}.crh-new-{job_id}")
    _remove_tree(parent / f".{name}.crh-staging-{job_id}")
    (parent / f".{name}.crh-{job_id}.tar.zst").unlink(missing_ok=True)


def _bring_back(conn, where: store.Store, w: Work, limits: archive.Limits) -> None:
    job, cf, tomodir, item = w.job, w.cf, w.tomodir, w.item
    parent = tomodir.parent
    marker = tomodir / f"{MARKER_PREFIX}{job.id}"
    new = parent / f".{tomodir.name}.crh-new-{job.id}"
    packed = parent / f".{tomodir.name}.crh-{job.id}.tar.zst"
    staging = parent / f".{tomodir.name}.crh-staging-{job.id}"
    # Whatever an interrupted run left beside the tomodir is of no further use.
    packed.unlink(missing_ok=True)
    _remove_tree(staging)
    if marker.exists():
        # An earlier run was interrupted after its exchange: the results are in place.
        swap.reconcile(new, tomodir)
        return
    _remove_tree(new)
    if job.result_sha256 is None:
        return
    # Typical results stay in memory; large ones spill to a file beside the tomodir.
    with Spool(SPOOL_BYTES, parent, packed.name) as download, disk_full.watching(parent, download):
        size = store.fetch(conn, where, job.result_sha256, download, row=w.blob)
        pause_point("retrieve:downloaded")
        try:
            swap.link_copy(tomodir, new)
        except swap.SwapUnsupported:
            _remove_tree(new)
            _unpack_moving(download.source(), size, staging, tomodir, cf.manifest, item, limits)
            return
        try:
            # Straight into the copy: its files are the user's (same inodes), so
            # the placement rules see exactly what they would see in the tomodir.
            archive.unpack(download.source(), new, limits=limits, place=placement.Placement(cf.manifest, item), size=size)
            (new / marker.name).touch()
            pause_point("retrieve:staged")
            swap.exchange(new, tomodir)
        except swap.SwapUnsupported:
            _remove_tree(new)
            item.files, item.conflicts = 0, []
            _unpack_moving(download.source(), size, staging, tomodir, cf.manifest, item, limits)
            return
        except BaseException:
            _remove_tree(new)
            raise
    pause_point("retrieve:exchanged")
    swap.reconcile(new, tomodir)


def _unpack_moving(
    source: memoryview | BinaryIO,
    size: int,
    staging: Path,
    tomodir: Path,
    manifest: dict[str, list[int]],
    item: Item,
    limits: archive.Limits,
) -> None:
    """Where directories cannot be exchanged: unpack beside the tomodir, then move file by file."""
    try:
        staging.mkdir(mode=0o700)
        archive.unpack(source, staging, limits=limits, size=size)
        placement.move_in(staging, tomodir, manifest, item)
    finally:
        _remove_tree(staging)


def _remove_tree(path: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _finish(tomodir: Path, job_id: int) -> None:
    (tomodir / f"{MARKER_PREFIX}{job_id}").unlink(missing_ok=True)


def wait_retrieve(
    db: Database,
    paths: Iterable[Path],
    *,
    limits: archive.Limits,
    poll_s: float = 5.0,
    progress: Callable[[Item], None] | None = None,
    on_round: Callable[[RetrieveReport], None] | None = None,
    max_wait_s: float | None = None,
    processes: int | None = None,
) -> RetrieveReport:
    """Retrieve as jobs finish, until nothing under the paths is pending."""
    paths = [Path(p) for p in paths]
    total = RetrieveReport()
    started = time.monotonic()
    while True:
        this_round = retrieve(db, paths, limits=limits, progress=progress, processes=processes)
        total.merge(this_round)
        if on_round is not None:
            on_round(total)
        if not this_round.pending and not this_round.elsewhere:
            return total
        if max_wait_s is not None and time.monotonic() - started > max_wait_s:
            return total
        time.sleep(poll_s)
