"""Where each result file lands in a tomodir: the user's own changes are never overwritten.

A file the user changed after crh_add (its size or modification time differs
from the manifest in the ``.crh``), or a symlink, is not replaced: the result
is put beside it as ``NAME.crh-result``, unless it is identical already.
The same rules serve both ways a retrieval fills a tomodir: unpacking
straight into its hard-link copy (:class:`Placement`) and moving files in
from a staging directory (:func:`move_in`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from cr_queue.tomodir.walk import walk

CONFLICT_SUFFIX = ".crh-result"


class Tally(Protocol):
    """What the rules count for a tomodir's report: files placed, and those put beside the user's."""

    files: int
    conflicts: list[str]


class Placement:
    """Where each result file lands in the tomodir's copy (an archive.Place).

    A file the user changed after crh_add, or a symlink, is not replaced: the
    result goes beside it as NAME.crh-result, unless it is identical already."""

    def __init__(self, manifest: dict[str, list[int]], tally: Tally) -> None:
        self._manifest = manifest
        self._tally = tally

    def __call__(self, rel: str, parent_fd: int, name: str, tmp: str) -> str | None:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._tally.files += 1
            return name
        if not stat.S_ISLNK(st.st_mode) and self._manifest.get(rel) == [st.st_size, st.st_mtime_ns]:
            self._tally.files += 1
            return name
        if stat.S_ISREG(st.st_mode) and _same_content_at(parent_fd, tmp, name):
            return None
        self._tally.files += 1
        self._tally.conflicts.append(rel)
        return name + CONFLICT_SUFFIX


def move_in(staging: Path, into: Path, manifest: dict[str, list[int]], tally: Tally) -> None:
    """Move result files into ``into`` (the tomodir, or its hard-link copy: same inodes, same verdicts)."""
    for rel, entry in walk(staging):
        target = into / rel
        if entry.is_dir(follow_symlinks=False):
            target.mkdir(exist_ok=True)
            continue
        source = Path(entry.path)
        if target.is_symlink() or (target.exists() and _user_changed(target, rel, manifest)):
            if target.is_file() and not target.is_symlink() and _same_content(source, target):
                continue
            os.replace(source, target.with_name(target.name + CONFLICT_SUFFIX))
            tally.conflicts.append(rel)
        else:
            os.replace(source, target)
        tally.files += 1


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
