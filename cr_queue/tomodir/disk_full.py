"""A full disk while a result is brought back: said with what it takes to go on.

crh_retrieve writes a result beside its tomodir before it exchanges the two,
so a filesystem that fills up (ENOSPC, or EDQUOT for a user's quota) stops
that tomodir only: the caller removes what it began and reports the
tomodir with the space the result needs, the space free, and which
filesystem it is, so the user knows what to free or where to move the tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cr_queue.tomodir.archive.stream import decompressor

# The errors that mean "this filesystem has no room for it".
FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(Exception):
    """A result did not fit on the filesystem of ``where``; ``needed``: its bytes unpacked (0 if unknown)."""

    def __init__(self, where: Path, needed: int, cause: OSError) -> None:
        super().__init__(str(cause))
        self.where = where
        self.needed = needed
        self.cause = cause

    def message(self, tomodir: Path, job_id: int) -> str:
        mount, fstype = filesystem_of(self.where)
        try:
            free = shutil.disk_usage(self.where).free
        except OSError:
            free = 0
        what = "over its disk quota" if self.cause.errno == errno.EDQUOT else "no space left"
        needed = f"needs about {_size(self.needed)}" if self.needed else "needs more than is there"
        return (
            f"{tomodir}: job {job_id}'s result was not brought back: {what} on {mount} ({fstype}); "
            f"the result {needed} unpacked, and {_size(free)} is free there. The tomodir was left as it was: "
            "free space on that filesystem (or move the tree to one with room), then run crh_retrieve again."
        )


@contextlib.contextmanager
def watching(where: Path, download) -> Iterator[None]:
    """Turn a full disk below into :class:`DiskFull`, sizing the result held in ``download`` (a Spool)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        raise DiskFull(where, _needed(download), exc) from exc


def _needed(download) -> int:
    """The result's size unpacked (its tar headers summed), or what was downloaded of it."""
    try:
        return unpacked_size(download.source())
    except Exception:  # noqa: BLE001 - a partial download: its own size is the best guess
        return len(download)


def unpacked_size(source: memoryview | BinaryIO) -> int:
    """The bytes a zstd-compressed tar unpacks to, read as a stream (nothing is written)."""
    if isinstance(source, memoryview):
        source = _MemoryReader(source)
    with decompressor().stream_reader(source, closefd=False) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        return sum(member.size for member in tar if member.isfile())


class _MemoryReader:
    """A memoryview as the read() that zstandard's stream_reader asks for."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else self._pos + n
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk


def filesystem_of(path: Path) -> tuple[str, str]:
    """The mount point holding ``path`` and its filesystem type (from /proc/self/mounts)."""
    path = Path(os.path.abspath(path))
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return str(path), "unknown filesystem"
    mount = path
    while mount.parent != mount and os.stat(mount.parent).st_dev == dev:
        mount = mount.parent
    fstype = "unknown filesystem"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[1].replace("\\040", " ") == str(mount):
                    fstype = fields[2]
    except OSError:
        pass
    return str(mount), fstype


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
