"""The worker's scratch directories: one private directory per job under --workdir.

A finished job's directory is removed in the background (removing a tomodir
took 10-20 ms on a busy disk, time the slot would not claim); directories of
workers on this node that died without cleaning up are swept; and a scratch
filesystem that filled up under a solver is recognised (its outputs may be cut
short while the real solvers still exit 0).
"""

from __future__ import annotations

import os
import queue as _queue
import shutil
import threading
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
            shutil.rmtree(path, ignore_errors=True)

    def _sweep_tmp(self) -> None:
        """Remove job directories of workers on this node that died without cleaning up."""
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
                if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid():
                    shutil.rmtree(entry.path, ignore_errors=True)
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


def scratch_full(tomodir: Path) -> str | None:
    """Why the scratch filesystem holding ``tomodir`` counts as full, or None."""
    try:
        st = os.statvfs(tomodir)
    except OSError as exc:
        return f"cannot check the free space of the scratch filesystem at {tomodir}: {exc}"
    free = st.f_bavail * st.f_frsize
    if free < SCRATCH_MIN_FREE or (st.f_files and st.f_favail == 0):
        return (
            f"the scratch filesystem at {tomodir.parent.parent} was full when the solver ended "
            f"({free} bytes, {st.f_favail} inodes free): its output may be cut short; "
            "free space there or point --workdir at a larger filesystem"
        )
    return None
