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

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import archive, control, queue, store, swap
from .spool import Spool
from .db import Database
from .pause import pause_point

CONFLICT_SUFFIX = ".crh-result"
# Left inside a retrieved tomodir between the exchange and the end, so a rerun knows.
MARKER_PREFIX = ".crh-retrieved-"
# Results up to this size are held in memory between download and unpacking.
SPOOL_BYTES = 16 << 20
PENDING = ("registering", "queued", "running")


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
    retrieved: list[Item] = field(default_factory=list)
    failed: list[Item] = field(default_factory=list)
    pending: list[Item] = field(default_factory=list)
    cancelled: list[Item] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.problems) else 0

    def merge(self, other: RetrieveReport) -> None:
        self.retrieved += other.retrieved
        self.failed += other.failed
        self.cancelled += other.cancelled
        self.problems += other.problems
        self.pending = other.pending


def retrieve(
    db: Database,
    paths: Iterable[Path],
    *,
    progress: Callable[[Item], None] | None = None,
) -> RetrieveReport:
    report = RetrieveReport()
    try:
        crh_files = control.find([Path(p) for p in paths])
    except control.ControlFileError as exc:
        report.problems.append(str(exc))
        return report
    controls: list[tuple[Path, control.ControlFile]] = []
    for crh in crh_files:
        try:
            controls.append((crh, control.read(crh)))
        except control.ControlFileError as exc:
            report.problems.append(str(exc))
    if not controls:
        return report
    actor = queue.Actor()
    conn = db.connect("crh_retrieve")
    pool = _Pool(db) if len(controls) > 1 and RETRIEVE_THREADS > 1 and not os.environ.get("CRH_PAUSE_AT") else None
    try:
        jobs = queue.get_jobs(conn, [cf.job_id for _, cf in controls])
        work = []
        for crh, cf in controls:
            tomodir = crh.with_suffix("")
            job = jobs.get(cf.job_id)
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
            if job.status == "cancelled":
                control.remove(crh)
                report.cancelled.append(item)
                if progress is not None:
                    progress(item)
                continue
            args = (job, cf, crh, tomodir, item)
            work.append((item, crh, pool.submit(_retrieve_one, *args) if pool else None, args))
        done: list[tuple[Item, Path]] = []
        settled_at = time.monotonic()

        def settle() -> None:
            """Flag a batch of brought-back jobs downloaded (one commit), then drop their markers and .crh files."""
            nonlocal settled_at
            settled_at = time.monotonic()
            if not done:
                return
            queue.mark_downloaded_many(conn, [item.job_id for item, _ in done], actor)
            for item, crh in done:
                _finish(item.path, item.job_id)
                control.remove(crh)
                (report.retrieved if item.status == "finished" else report.failed).append(item)
                if progress is not None:
                    progress(item)
            done.clear()

        for item, crh, future, args in work:
            if future is not None and not future.done() and time.monotonic() - settled_at >= SETTLE_EVERY_S:
                settle()  # while the threads work on
            problem = future.result() if future is not None else _retrieve_one(conn, *args)
            if problem is not None:
                report.problems.append(problem)
                continue
            done.append((item, crh))
            if len(done) >= SETTLE_BATCH:
                settle()
        settle()
    finally:
        if pool is not None:
            pool.close()
        conn.close()
    return report


# Tomodirs brought back at the same time, each thread on its own connection:
# a retrieval is mostly file-system calls and a commit, which release the GIL.
# Measured in docs/performance.md.
RETRIEVE_THREADS = 3


# Jobs flagged 'downloaded' in one statement.  Until its flag is committed a
# tomodir keeps its .crh and its retrieval marker, so a rerun after a crash
# finds it complete (the marker) and only flags it.
SETTLE_BATCH = 64
# While threads are still bringing tomodirs back, the main thread settles what
# is done at most this often (and so often the progress output moves): it
# settled nearly every tomodir on its own before, 90 commits and as many
# thread switches for 101 tomodirs, now 5.
SETTLE_EVERY_S = 0.5


def _retrieve_one(conn, job: queue.Job, cf: control.ControlFile, crh: Path, tomodir: Path, item: Item) -> str | None:
    """Bring one job's result into its tomodir; a problem to report, or None."""
    try:
        _bring_back(conn, job, cf, tomodir, item)
    except (archive.ArchiveError, store.BlobMissing) as exc:
        return f"{crh}: job {job.id}'s result cannot be used: {exc}"
    return None


class _Pool:
    """RETRIEVE_THREADS threads with a connection each, each bringing back whole tomodirs (:func:`_retrieve_one`)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._local = threading.local()
        self._conns: list = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(RETRIEVE_THREADS, thread_name_prefix="crh_retrieve")

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._db.connect("crh_retrieve")
            with self._lock:
                self._conns.append(conn)
        return conn

    def submit(self, fn, *args):
        return self._executor.submit(lambda: fn(self._conn(), *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for conn in self._conns:
            conn.close()


def _bring_back(conn, job: queue.Job, cf: control.ControlFile, tomodir: Path, item: Item) -> None:
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
    with Spool(SPOOL_BYTES, parent, packed.name) as download:
        size = store.fetch(conn, job.result_sha256, download)
        pause_point("retrieve:downloaded")
        try:
            swap.link_copy(tomodir, new)
        except swap.SwapUnsupported:
            _remove_tree(new)
            _unpack_moving(download.source(), size, staging, tomodir, cf.manifest, item)
            return
        try:
            # Straight into the copy: its files are the user's (same inodes), so
            # the placement rules see exactly what they would see in the tomodir.
            archive.unpack(download.source(), new, place=_Placement(cf.manifest, item), size=size)
            (new / marker.name).touch()
            pause_point("retrieve:staged")
            swap.exchange(new, tomodir)
        except swap.SwapUnsupported:
            _remove_tree(new)
            item.files, item.conflicts = 0, []
            _unpack_moving(download.source(), size, staging, tomodir, cf.manifest, item)
            return
        except BaseException:
            _remove_tree(new)
            raise
    pause_point("retrieve:exchanged")
    swap.reconcile(new, tomodir)


def _unpack_moving(source: memoryview | BinaryIO, size: int, staging: Path, tomodir: Path, manifest: dict[str, list[int]], item: Item) -> None:
    """Where directories cannot be exchanged: unpack beside the tomodir, then move file by file."""
    try:
        staging.mkdir(mode=0o700)
        archive.unpack(source, staging, size=size)
        _merge(staging, tomodir, manifest, item)
    finally:
        _remove_tree(staging)


def _remove_tree(path: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


class _Placement:
    """Where each result file lands in the tomodir's copy (see archive.Place).

    A file the user changed after crh_add, or a symlink, is not replaced: the
    result goes beside it as NAME.crh-result, unless it is identical already."""

    def __init__(self, manifest: dict[str, list[int]], item: Item) -> None:
        self._manifest = manifest
        self._item = item

    def __call__(self, rel: str, parent_fd: int, name: str, tmp: str) -> str | None:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._item.files += 1
            return name
        if not stat.S_ISLNK(st.st_mode) and self._manifest.get(rel) == [st.st_size, st.st_mtime_ns]:
            self._item.files += 1
            return name
        if stat.S_ISREG(st.st_mode) and _same_content_at(parent_fd, tmp, name):
            return None
        self._item.files += 1
        self._item.conflicts.append(rel)
        return name + CONFLICT_SUFFIX


def _finish(tomodir: Path, job_id: int) -> None:
    (tomodir / f"{MARKER_PREFIX}{job_id}").unlink(missing_ok=True)


def _merge(staging: Path, into: Path, manifest: dict[str, list[int]], item: Item) -> None:
    """Move result files into ``into`` (the tomodir, or its hard-link copy: same inodes, same verdicts)."""
    for dirpath, dirnames, filenames in os.walk(staging):
        rel_dir = Path(dirpath).relative_to(staging)
        (into / rel_dir).mkdir(parents=True, exist_ok=True)
        dirnames.sort()
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            source = Path(dirpath) / name
            target = into / rel
            if target.is_symlink() or (target.exists() and _user_changed(target, rel, manifest)):
                if target.is_file() and not target.is_symlink() and _same_content(source, target):
                    continue
                os.replace(source, target.with_name(target.name + CONFLICT_SUFFIX))
                item.conflicts.append(rel)
            else:
                os.replace(source, target)
            item.files += 1


def _user_changed(target: Path, rel: str, manifest: dict[str, list[int]]) -> bool:
    """True when the file is not as crh_add saw it: the user's, not ours to replace."""
    recorded = manifest.get(rel)
    if recorded is None:
        return True
    st = target.stat()
    return [st.st_size, st.st_mtime_ns] != list(recorded)


def _same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return _same_stream(fa, fb)


def _same_content_at(dir_fd: int, a: str, b: str) -> bool:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(a, flags, dir_fd=dir_fd), "rb") as fa, open(os.open(b, flags, dir_fd=dir_fd), "rb") as fb:
        return _same_stream(fa, fb)


def _same_stream(fa, fb) -> bool:
    if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
        return False
    while True:
        block_a, block_b = fa.read(1 << 20), fb.read(1 << 20)
        if block_a != block_b:
            return False
        if not block_a:
            return True


def wait_retrieve(
    db: Database,
    paths: Iterable[Path],
    *,
    poll_s: float = 5.0,
    progress: Callable[[Item], None] | None = None,
    on_round: Callable[[RetrieveReport], None] | None = None,
    max_wait_s: float | None = None,
) -> RetrieveReport:
    """Retrieve as jobs finish, until nothing under the paths is pending."""
    paths = [Path(p) for p in paths]
    total = RetrieveReport()
    started = time.monotonic()
    while True:
        this_round = retrieve(db, paths, progress=progress)
        total.merge(this_round)
        if on_round is not None:
            on_round(total)
        if not this_round.pending:
            return total
        if max_wait_s is not None and time.monotonic() - started > max_wait_s:
            return total
        time.sleep(poll_s)
