"""File manifests: which files a solver wrote, told from (size, mtime_ns) without hashing gigabytes."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

from cr_queue.tomodir.walk import walk


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every regular file: cheap to take, and enough to
    tell which files a solver wrote."""
    found: dict[str, tuple[int, int]] = {}
    for rel, entry in walk(root):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def changed_since(root: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """Files that are new or differ from `before`, plus empty directories
    that held no file in `before` (an empty inv/ must survive the trip
    back). Such a directory may already have existed empty; re-sending it is
    harmless, missing it is not."""
    changed: list[str] = []
    dirs: list[str] = []
    non_empty: set[str] = set()
    for rel, entry in walk(root):
        non_empty.add(rel.rpartition("/")[0])
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            if before.get(rel) != (st.st_size, st.st_mtime_ns):
                changed.append(rel)
        elif stat.S_ISDIR(st.st_mode):
            dirs.append(rel)
    had_files = {parent for path in before for parent in _ancestors(path)}
    changed.extend(d for d in dirs if d not in non_empty and d not in had_files)
    return sorted(changed)


def _ancestors(rel: str) -> Iterator[str]:
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])
