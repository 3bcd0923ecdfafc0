"""Unpacking: a zstd tar stream extracted member by member, treating every archive as hostile.

A result archive comes back from a compute node that the workstation does
not control, and it is unpacked into the user's own tree; an input archive
reaches a compute node from whoever could add a job.  So every member is
written relative to an open directory descriptor, every path component is
opened with O_NOFOLLOW, nothing but directories, files and links that stay
inside is accepted, and the caps in :class:`~sizes.Limits` stop a
decompression bomb before its bytes are written.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import secrets
import stat
import tarfile
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

import zstandard

from cr_queue.tomodir.archive.errors import ArchiveError, UnsafeArchive
from cr_queue.tomodir.archive.headers import BLOCK
from cr_queue.tomodir.archive.members import escapes, inside, parts as member_parts
from cr_queue.tomodir.archive.sizes import CHUNK, Limits
from cr_queue.tomodir.archive.stream import ForwardReader, decompressor

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """tarfile parses the pax mtime as a float and would lose nanoseconds.
    Clamped because a crafted header can hold a time no kernel accepts."""
    try:
        seconds = Decimal(info.pax_headers.get("mtime", str(info.mtime)))
        ns = int(seconds.scaleb(9)) if seconds.is_finite() and seconds.adjusted() < 12 else 0
    except (InvalidOperation, ValueError):
        ns = 0
    return max(-(2**63), min(ns, 2**63 - 1))


def _kind(info: tarfile.TarInfo) -> str:
    if info.ischr():
        return "character device nodes are not allowed"
    if info.isblk():
        return "block device nodes are not allowed"
    if info.isfifo():
        return "FIFOs are not allowed"
    return f"member type {info.type!r} is not allowed"


Place = Callable[[str, int, str, str], "str | None"]
"""``place(rel, parent_fd, name, tmp)``: the name in the same directory that the
member ``rel``, finished under the temporary name ``tmp`` in the directory open
as ``parent_fd``, is renamed to (usually ``name``), or None to drop it."""


class _Extractor:
    """Creates members relative to an open directory descriptor, walking
    every path component with O_NOFOLLOW, so no symlink - in the archive or
    already in the destination - can redirect a write."""

    def __init__(self, dest: Path, limits: Limits, reader: ForwardReader, place: Place | None = None) -> None:
        self._limits = limits
        self._reader = reader
        self._place = place
        self._dest_real = os.path.realpath(dest)
        self._root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cached: tuple[tuple[str, ...], int] = ((), self._root)
        self._bytes = 0
        self._count = 0
        self._links: list[str] = []
        self._dirs: list[tuple[list[str], int, int]] = []
        self.names: list[str] = []

    # -- directory descriptors

    def _subdir(self, fd: int, parts: list[str], depth: int, member: str, create: bool) -> int:
        part = parts[depth]
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise UnsafeArchive(member, f"{'/'.join(parts[: depth + 1])!r} does not exist") from None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            prefix = "/".join(parts[: depth + 1])
            if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                raise UnsafeArchive(member, f"{prefix!r} is a symlink; refusing to write through it") from None
            raise UnsafeArchive(member, f"{prefix!r} exists and is not a directory") from None
        try:
            os.mkdir(part, 0o777, dir_fd=fd)
        except FileExistsError:
            pass
        return self._subdir(fd, parts, depth, member, create=False)

    def _open_dir(self, parts: list[str], member: str, create: bool) -> int:
        fd = self._root
        try:
            for depth in range(len(parts)):
                nxt = self._subdir(fd, parts, depth, member, create)
                if fd != self._root:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self._root:
                os.close(fd)
            raise
        return fd

    def _parent(self, parts: list[str], member: str) -> int:
        """Descriptor of the member's parent, cached because archives list
        the files of one directory together."""
        key = tuple(parts[:-1])
        if self._cached[0] != key:
            fd = self._open_dir(list(key), member, create=True)
            self._drop_cache()
            self._cached = (key, fd)
        return self._cached[1]

    def _drop_cache(self) -> None:
        if self._cached[1] != self._root:
            os.close(self._cached[1])
        self._cached = ((), self._root)

    # -- members

    def add(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self._count += 1
        if self._count > self._limits.max_members:
            raise UnsafeArchive(info.name, f"archive has more than {self._limits.max_members} members")
        parts = member_parts(info.name, info.name, "name")
        if not parts:
            return
        if info.isreg():
            self._file(info, tar, parts)
        elif info.isdir():
            self._dir(info, parts)
        elif info.issym():
            self._symlink(info, parts)
        elif info.islnk():
            self._hardlink(info, parts)
        else:
            raise UnsafeArchive(info.name, _kind(info))
        self.names.append("/".join(parts))

    def _replace_entry(self, make: Callable[[], None], parent: int, base: str, member: str) -> None:
        try:
            make()
            return
        except FileExistsError:
            pass
        if stat.S_ISDIR(os.stat(base, dir_fd=parent, follow_symlinks=False).st_mode):
            raise UnsafeArchive(member, "a directory of that name already exists in the destination")
        os.unlink(base, dir_fd=parent)
        make()

    def _file(self, info: tarfile.TarInfo, tar: tarfile.TarFile, parts: list[str]) -> None:
        if self._bytes + info.size > self._limits.max_bytes:
            raise UnsafeArchive(info.name, f"unpacked size would exceed the limit of {self._limits.max_bytes} bytes")
        self._bytes += info.size
        parent = self._parent(parts, info.name)
        # A fresh file renamed into place never writes through an existing
        # symlink or hard link, and never leaves a half-written result.
        tmp = _temporary_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            try:
                if info.sparse is None:
                    self._copy_data(fd, info)
                else:
                    with tar.extractfile(info) as source:  # type: ignore[union-attr]
                        while data := source.read(CHUNK):
                            _write_all(fd, memoryview(data))
                os.fchmod(fd, info.mode & 0o777)
                mtime = _mtime_ns(info)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
            self._rename_into_place(tmp, parent, parts, info.name)
        except BaseException:
            _discard(tmp, parent)
            raise

    def _rename_into_place(self, tmp: str, parent: int, parts: list[str], member: str) -> str | None:
        """Rename a finished temporary entry to the name the caller's ``place`` chose
        (default: the member's own); returns that name, None when it was dropped."""
        name: str | None = parts[-1]
        if self._place is not None:
            name = self._place("/".join(parts), parent, parts[-1], tmp)
            if name is None:
                os.unlink(tmp, dir_fd=parent)
                return None
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"place() must return a name in the same directory, not {name!r}")
        try:
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except IsADirectoryError:
            raise UnsafeArchive(member, "a directory of that name already exists in the destination") from None
        return name

    def _copy_data(self, fd: int, info: tarfile.TarInfo) -> None:
        """The reader sits at the member's data right after tarfile parsed
        its header; copying from there avoids two layers of copies."""
        left = info.size
        while left:
            block = self._reader.take(left)
            if not block:
                raise EOFError(f"archive ends inside member {info.name!r}")
            _write_all(fd, block)
            left -= len(block)

    def _dir(self, info: tarfile.TarInfo, parts: list[str]) -> None:
        parent = self._parent(parts, info.name)
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
            created = True
        except FileExistsError:
            created = False
        os.close(self._subdir(parent, parts, len(parts) - 1, info.name, create=False))
        if created:
            self._dirs.append((parts, info.mode & 0o777, _mtime_ns(info)))

    def _symlink(self, info: tarfile.TarInfo, parts: list[str]) -> None:
        target = info.linkname
        if not target:
            raise UnsafeArchive(info.name, "symlink has an empty target")
        if target.startswith("/"):
            raise UnsafeArchive(info.name, f"symlink target {target!r} is an absolute path")
        lexical = posixpath.normpath(posixpath.join(*parts[:-1], target) if len(parts) > 1 else target)
        if escapes(lexical):
            raise UnsafeArchive(info.name, f"symlink target {target!r} points outside the destination")
        parent = self._parent(parts, info.name)
        base = parts[-1]
        if self._place is None:
            self._replace_entry(lambda: os.symlink(target, base, dir_fd=parent), parent, base, info.name)
        else:
            tmp = _temporary_name()
            os.symlink(target, tmp, dir_fd=parent)
            try:
                placed = self._rename_into_place(tmp, parent, parts, info.name)
            except BaseException:
                _discard(tmp, parent)
                raise
            if placed is None:
                return
            base = placed
        name = "/".join([*parts[:-1], base])
        self._links.append(name)
        self._check_link(name, info.name)

    def _hardlink(self, info: tarfile.TarInfo, parts: list[str]) -> None:
        target = member_parts(info.linkname, info.name, "hard link target")
        if not target or target == parts:
            raise UnsafeArchive(info.name, f"hard link target {info.linkname!r} is not another file")
        source = self._open_dir(target[:-1], info.name, create=False)
        try:
            try:
                mode = os.stat(target[-1], dir_fd=source, follow_symlinks=False).st_mode
            except FileNotFoundError:
                raise UnsafeArchive(info.name, f"hard link target {info.linkname!r} does not exist") from None
            if not stat.S_ISREG(mode):
                raise UnsafeArchive(info.name, f"hard link target {info.linkname!r} is not a regular file")
            parent = self._parent(parts, info.name)
            base = parts[-1]
            self._replace_entry(
                lambda: os.link(target[-1], base, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False),
                parent,
                base,
                info.name,
            )
        finally:
            if source != self._root:
                os.close(source)

    # -- checks and finishing

    def _check_link(self, name: str, member: str) -> None:
        """Lexical checks cannot see a chain like `d -> ..` then `e -> d/../x`;
        the resolved path can."""
        if inside(os.path.realpath(os.path.join(self._dest_real, name)), self._dest_real):
            return
        parts = name.split("/")
        parent = self._open_dir(parts[:-1], member, create=False)
        try:
            os.unlink(parts[-1], dir_fd=parent)
        finally:
            if parent != self._root:
                os.close(parent)
        raise UnsafeArchive(member, "symlink resolves outside the destination through other symlinks")

    def finish(self) -> None:
        for name in self._links:
            self._check_link(name, name)
        self._apply_dirs()

    def _apply_dirs(self) -> None:
        """Directory modes and mtimes go last: writing members changes a
        directory's mtime, and a read-only directory could not be filled."""
        while self._dirs:
            parts, mode, mtime = self._dirs.pop()
            fd = self._open_dir(parts, "/".join(parts), create=False)
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Best effort after a failure: no escaping symlink stays behind and
        created directories get their modes."""
        for name in self._links:
            try:
                self._check_link(name, name)
            except (UnsafeArchive, OSError):
                pass
        try:
            self._apply_dirs()
        except (UnsafeArchive, OSError):
            pass

    def close(self) -> None:
        self._drop_cache()
        os.close(self._root)


def _temporary_name() -> str:
    return f".crq-{secrets.token_hex(8)}.part"


def _discard(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


_THREAD_ABOVE = 2 * CHUNK


def _size_of(src: BinaryIO | memoryview) -> int:
    """Bytes left in a file, or "large" when that cannot be known (a pipe, a socket)."""
    if isinstance(src, memoryview):
        return src.nbytes
    try:
        return os.fstat(src.fileno()).st_size - src.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 1 << 62


def unpack(
    src: BinaryIO | memoryview,
    dest: Path,
    *,
    limits: Limits,
    place: Place | None = None,
    size: int | None = None,
) -> list[str]:
    """Extract a zstd-compressed tar stream into `dest`, member by member.

    Verify the archive's sha256 *before* calling this (copy_verified): a
    rejection mid-stream leaves the members already extracted in place.

    Every file and symlink is written under a temporary name beside its
    target and renamed into place; `place`, when given, chooses that final
    name (see :data:`Place`), so a caller unpacking into a tree that already
    holds files decides which of them a member may replace.  `src` is a file
    or the archive's bytes in memory (a :class:`~cr_queue.spool.Spool`'s view,
    read in place); `size` is the archive's length where the caller knows it
    and `src` is a file that cannot say (a pipe, a socket)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    reader = decompressor().stream_reader(
        src, read_size=CHUNK, read_across_frames=True, closefd=False
    )
    # A small archive is decompressed in this thread: the hand-over to a
    # second one cost more than it saved below a few blocks (retrieve of 100
    # one-megabyte tomodirs: docs/performance.md).
    forward = ForwardReader(reader, threaded=(_size_of(src) if size is None else size) > _THREAD_ABOVE)
    try:
        extractor = _Extractor(dest, limits, forward, place)
        ok = False
        try:
            with tarfile.TarFile(fileobj=forward, mode="r") as tar:  # type: ignore[arg-type]
                while (info := tar.next()) is not None:
                    tar.members.clear()  # tarfile keeps every header otherwise
                    forward.boundary = info.offset_data + (info.size + -info.size % BLOCK if info.isreg() else 0)
                    forward.last_member = info.name
                    extractor.add(info, tar)
            if forward.truncated:
                raise EOFError(f"the archive ends without an end-of-archive marker after {forward.last_member!r}")
            extractor.finish()
            ok = True
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
            raise ArchiveError(f"corrupt or truncated archive while unpacking into {dest}: {e}") from e
        finally:
            if not ok:
                extractor.abort()
            extractor.close()
    finally:
        forward.close()
    return extractor.names
