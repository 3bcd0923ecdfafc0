"""The worker's scratch directories: one private directory per job under --workdir.

A finished job's directory is removed in the background (removing a tomodir
took 10-20 ms on a busy disk, time the slot would not claim); directories of
workers on this node that died without cleaning up are swept; and a scratch
filesystem that filled up under a solver is recognised (its outputs may be cut
short while the real solvers still exit 0), also after the space came back:
see :class:`ScratchWatch`.
"""

from __future__ import annotations

import errno
import os
import queue as _queue
import shutil
import threading
import time
from pathlib import Path

from cr_queue.worker.options import SCRATCH_MIN_FREE, TMP_PREFIX


class ScratchMixin:
    """The scratch-directory part of Worker (its state lives in Worker.__init__)."""

    def _discard(self, path: Path | None) -> None:
        """Remove a finished job's directory in the background, so the slot claims its next
        job at once (removing a tomodir took 10-20 ms on a busy disk); None: wait until done."""
        with self._lock:
            if self._trash is None:
                if path is None:
                    return
                self._trash = _queue.SimpleQueue()
                self._trash_thread = threading.Thread(target=self._empty_trash, name="cleanup", daemon=True)
                self._trash_thread.start()
        self._trash.put(path)
        if path is None:
            self._trash_thread.join()

    def _empty_trash(self) -> None:
        while (path := self._trash.get()) is not None:
            # Freeing space on a full filesystem ends the moment the other slots' solvers
            # may have failed in: remembered first (ScratchWatch).
            self._scratch_watch.look(path)
            shutil.rmtree(path, ignore_errors=True)

    def _remove_now(self, path: Path) -> bool:
        """Remove a job directory at once, not in the background, and say whether the scratch
        filesystem has room again without it: a job whose output is too large for this node,
        or one that failed beside it, is not a broken node (NodeFailure.space)."""
        self._scratch_watch.look(path)
        shutil.rmtree(path, ignore_errors=True)
        try:
            return _full(self.workdir) is None
        except OSError:
            return False

    def _sweep_tmp(self) -> None:
        """Remove job directories of workers on this node that died without cleaning up.

        Found here, removed by the cleanup thread: the control thread that calls this
        also beats and renews the leases, which a large tree's removal must not delay."""
        try:
            entries = list(os.scandir(self.workdir))
        except OSError:
            return
        mine = f"{TMP_PREFIX}{os.getpid()}-"
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX) or entry.name.startswith(mine):
                continue
            pid_text = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            try:
                if (
                    entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                    and entry.path not in self._swept
                ):
                    self._swept.add(entry.path)
                    self._discard(Path(entry.path))
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _full(path: Path) -> tuple[int, int] | None:
    """(bytes, inodes) free on the filesystem holding ``path`` when it counts as full, else None."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < SCRATCH_MIN_FREE or (st.f_files and st.f_favail == 0):
        return free, st.f_favail
    return None


def scratch_full(tomodir: Path, watch: ScratchWatch | None = None) -> str | None:
    """Why the scratch filesystem holding ``tomodir`` counts as full, or None."""
    try:
        full = _full(tomodir)
    except OSError as exc:
        return f"cannot check the free space of the scratch filesystem at {tomodir}: {exc}"
    if full is None:
        return None
    if watch is not None:
        watch.saw_full()
    return (
        f"the scratch filesystem at {tomodir.parent.parent} was full when the solver ended "
        f"({full[0]} bytes, {full[1]} inodes free): its output may be cut short; "
        "free space there or point --workdir at a larger filesystem"
    )


# What a solver that ran out of space says (the C library's text; gfortran's runtime
# errors and Python's tracebacks quote it), in its log or its error.dat.
NO_SPACE_TEXT = os.strerror(errno.ENOSPC)
# How often the filesystem is looked at while solvers run.
WATCH_EVERY_S = 0.1


class ScratchWatch:
    """When the scratch filesystem was last seen full, to judge a solver that failed.

    A solver that runs out of space fails in its own way (exit 1, an error.dat,
    a runtime error on a log it could not write either), and by the time its
    slot looks, the space may be back: another slot's job directory removed,
    the filler itself gone.  The fault run (seed 1) saw such jobs judged as
    their own failures.  So every look is remembered: the slots' checks when a
    solver ends, the clean-up's before it frees a directory, and a sampler
    while solvers run.  A failed step that overlapped a full moment is the
    node's failure, not the job's."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._lock = threading.Lock()
        self._last_full: float | None = None
        self._running = 0
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def saw_full(self) -> None:
        with self._lock:
            self._last_full = time.monotonic()

    def look(self, path: Path | None = None) -> None:
        try:
            if _full(path or self._workdir) is not None:
                self.saw_full()
        except OSError:
            pass  # the directory is gone: nothing to learn

    def full_since(self, started: float) -> float | None:
        """The monotonic time the filesystem was last seen full, if at or after ``started``."""
        with self._lock:
            return self._last_full if self._last_full is not None and self._last_full >= started else None

    def solver_started(self) -> None:
        with self._lock:
            self._running += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, name="scratch-watch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def solver_ended(self) -> None:
        with self._lock:
            self._running -= 1

    def _sample(self) -> None:
        while True:
            with self._lock:
                while self._running == 0:
                    self._wake.wait()
            self.look()
            time.sleep(WATCH_EVERY_S)


def ran_out_of_space(tomodir: Path, log: Path) -> bool:
    """Whether the solver's log or error.dat says it could not write for want of space."""
    for path in (tomodir / "exe" / "error.dat", log):
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
                if NO_SPACE_TEXT.encode() in fh.read():
                    return True
        except OSError:
            continue
    return False
