"""Packing a tree: a PAX tar streamed through zstd into the caller's sink, hashed on the way.

Archives reach a gigabyte, so everything here works in fixed-size blocks:
nothing ever holds a whole archive (or a whole member) in memory.  Owners
are normalised to root and modes lose setuid/setgid so the receiving side
never cares who packed the tree.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from cr_queue.tomodir.archive.errors import ArchiveError
from cr_queue.tomodir.archive.hashing import HashingWriter, Writable
from cr_queue.tomodir.archive.headers import BLOCK, header
from cr_queue.tomodir.archive.members import escapes, inside
from cr_queue.tomodir.archive.sizes import CHUNK
from cr_queue.tomodir.walk import walk


@dataclass
class PackResult:
    sha256: str
    size: int  # compressed bytes written to out
    raw_size: int  # file bytes packed
    members: int
    skipped: list[str] = field(default_factory=list)
    # (size, mtime_ns) of every regular file packed, as manifest.snapshot() would give
    # them: crh_add's manifest without walking the tree a second time.
    manifest: dict[str, tuple[int, int]] = field(default_factory=dict)


def pack(
    root: Path,
    out: Writable,
    *,
    members: Iterable[str] | None = None,
    level: int = 1,
    threads: int = 0,
) -> PackResult:
    """Stream a PAX tar of `root` through zstd into `out`, hashing the output.

    Only directories, regular files and symlinks that stay inside `root` are
    stored; everything else is listed in `PackResult.skipped`.  `members`
    packs only those paths (with their parents, and a directory with all it
    holds).  `threads` > 0 uses zstd's own worker threads (the output then
    differs from single-threaded output, but is still deterministic for the
    same settings)."""
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise NotADirectoryError(errno.ENOTDIR, "cannot pack: not a directory", str(root))
    entries: Iterable[tuple[str, os.stat_result]]
    entries = _tree(root_real) if members is None else _select(root_real, members).items()
    sink = HashingWriter(out)
    compressor = _compressor(level, threads)
    result = PackResult(sha256="", size=0, raw_size=0, members=0)
    buf = _buffers.__dict__.get("buf")
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK)
    try:
        _pack_into(compressor, sink, root_real, entries, result, buf)
    except BaseException:
        _compressors.__dict__.get("by_setting", {}).pop((level, threads), None)  # a fresh context next time
        raise
    result.sha256 = sink.hexdigest()
    result.size = sink.size
    return result


def _tree(root: str, below: str = "") -> Iterable[tuple[str, os.stat_result]]:
    """Every entry of the tree (or of its subdirectory ``below``) with its lstat, in walk order."""
    top = os.path.join(root, below) if below else root
    prefix = below + "/" if below else ""
    for rel, entry in walk(top):
        yield prefix + rel, entry.stat(follow_symlinks=False)


def _select(root: str, members: Iterable[str]) -> dict[str, os.stat_result]:
    """The requested paths, their parent directories and, for a directory,
    its whole subtree (what `tar -c dir` would do)."""
    chosen: dict[str, os.stat_result] = {}
    for member in members:
        parts = [p for p in member.split("/") if p not in ("", ".")]
        if member.startswith("/") or ".." in parts or not parts:
            raise ValueError(f"archive member {member!r} must be a relative path below {root}")
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel in chosen:
                continue
            try:
                st = os.lstat(os.path.join(root, rel))
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, f"cannot pack {member!r}: no such file below {root}", rel
                ) from None
            if depth < len(parts) and not stat.S_ISDIR(st.st_mode):
                raise ValueError(f"cannot pack {member!r}: {rel!r} is not a directory")
            chosen[rel] = st
        if stat.S_ISDIR(chosen["/".join(parts)].st_mode):
            for rel, st in _tree(root, "/".join(parts)):
                chosen.setdefault(rel, st)
    # Component-wise order equals the walk's order: parents first, siblings by name.
    return dict(sorted(chosen.items(), key=lambda item: item[0].split("/")))


def _portable_link(root_real: str, rel: str) -> str | None:
    """The symlink target to store, or None if the link leaves the tree.

    Links that only reach inside the tree by an absolute path or a detour
    through its parent are rewritten as the equivalent relative path, because
    the extracting side accepts nothing else and the absolute path means
    nothing on another machine."""
    path = os.path.join(root_real, rel)
    resolved = os.path.realpath(path)
    if not inside(resolved, root_real):
        return None
    target = os.readlink(path)
    if not os.path.isabs(target):
        lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if not escapes(lexical):
            return target
    return os.path.relpath(resolved, os.path.dirname(path))


_compressors = threading.local()
# One read buffer per thread: a fresh zeroed megabyte per archive cost more
# than reading a small tomodir.
_buffers = threading.local()


def _compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and setting, reused: setting up zstd's
    context cost 1.4 ms per archive, a third of packing a 1 MB tomodir."""
    cache = _compressors.__dict__.setdefault("by_setting", {})
    found = cache.get((level, threads))
    if found is None:
        found = cache[(level, threads)] = zstandard.ZstdCompressor(level=level, threads=threads)
    return found


def _pack_file(root_real: str, rel: str, sink: Writable, buf: bytearray) -> int:
    path = os.path.join(root_real, rel)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"{path} stopped being a regular file while it was being packed")
        size = st.st_size
        sink.write(header(rel, st, tarfile.REGTYPE, size=size))
        view = memoryview(buf)
        left = size
        while left:
            n = f.readinto(view[: min(left, CHUNK)])
            if not n:
                raise ArchiveError(f"{path} shrank while it was being packed")
            sink.write(view[:n])
            left -= n
    pad = -size % BLOCK
    if pad:
        sink.write(bytes(pad))
    return size


def _pack_into(compressor, sink, root_real: str, entries, result: PackResult, buf: bytearray) -> None:
    with compressor.stream_writer(sink, write_size=CHUNK, closefd=False) as zw:
        for rel, st in entries:
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                zw.write(header(rel, st, tarfile.DIRTYPE))
            elif stat.S_ISREG(mode):
                result.raw_size += _pack_file(root_real, rel, zw, buf)
                result.manifest[rel] = (st.st_size, st.st_mtime_ns)
            elif stat.S_ISLNK(mode) and (target := _portable_link(root_real, rel)) is not None:
                zw.write(header(rel, st, tarfile.SYMTYPE, link=target))
            else:
                result.skipped.append(rel)
                continue
            result.members += 1
        zw.write(bytes(2 * BLOCK))
