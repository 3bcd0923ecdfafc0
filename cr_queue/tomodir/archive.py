"""Streaming tar + zstd + sha256 archives, safe extraction and file manifests.

Archives reach a gigabyte, so every function here works in fixed-size
blocks: nothing ever holds a whole archive (or a whole member) in memory.
The sha256 always covers the *compressed* bytes, because that is what the
store keeps and what every hop must verify before unpacking.

Extraction treats every archive as hostile: a result archive comes back from
a compute node that the workstation does not control, and it is unpacked
into the user's own tree.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import queue
import secrets
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

CHUNK = 1 << 20
"""Block size for reading, compressing and writing: large enough that the
per-call overhead of Python is negligible next to zstd and sha256."""

_MAX_HEADER = 1 << 20
"""Largest metadata (pax/GNU long-name headers) accepted before a member.
tarfile reads such headers into memory whole, so an unbounded one would be a
decompression bomb that no byte limit on members catches."""

_BLOCK = tarfile.BLOCKSIZE
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveError(Exception):
    """An archive could not be packed or unpacked."""


class ChecksumMismatch(ArchiveError):
    """The bytes received are not the bytes that were stored."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"archive checksum mismatch: expected sha256 {expected}, got {actual} "
            "(the data was corrupted in transfer or in storage)"
        )


class UnsafeArchive(ArchiveError):
    """A member would escape the destination or is not a plain file tree."""

    def __init__(self, member: str, reason: str) -> None:
        self.member = member
        self.reason = reason
        super().__init__(f"unsafe archive member {member!r}: {reason}")


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass
class PackResult:
    sha256: str
    size: int  # compressed bytes written to out
    raw_size: int  # file bytes packed
    members: int
    skipped: list[str] = field(default_factory=list)
    # (size, mtime_ns) of every regular file packed, as snapshot() would give
    # them: crh_add's manifest without walking the tree a second time.
    manifest: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """Caps on what one archive may unpack, checked before bytes are written.

    The defaults are hundreds of times a large real tomodir (a few MB of
    input, ~50 files, ~10 MB of results), so a decompression bomb stops
    early; ``[archive]`` in the config changes them (config.archive_limits).
    """

    max_bytes: int = 4 * 2**30
    max_members: int = 100_000


# What unpack() applies when its caller names no limits; commands set it from the config.
default_limits = Limits()


def set_default_limits(limits: Limits) -> None:
    global default_limits
    default_limits = limits


# --------------------------------------------------------------------------
# hashing


class _HashingWriter:
    """Sits between the compressor and the caller's sink so the digest covers
    exactly the bytes the caller stores."""

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self._out.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class HashingReader(io.RawIOBase):
    """Hashes a stream as it is consumed, so an upload can be checksummed in
    the same pass that sends it instead of reading the file twice."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self._raw.read(len(view))
        n = len(data)
        view[:n] = data
        self._sha.update(data)
        self.size += n
        return n

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def verify(self, expected: str) -> None:
        actual = self.hexdigest()
        if actual != expected.lower():
            raise ChecksumMismatch(expected, actual)


def copy_verified(chunks: Iterable[bytes], dst: BinaryIO | Writable, expected_sha256: str) -> int:
    """Copy downloaded chunks to `dst` and fail if their sha256 is not the
    expected one. The caller writes to a temporary file and unpacks only
    after this returns, so a corrupt download never reaches the user's tree."""
    sha = hashlib.sha256()
    total = 0
    for chunk in chunks:
        sha.update(chunk)
        dst.write(chunk)
        total += len(chunk)
    actual = sha.hexdigest()
    if actual != expected_sha256.lower():
        raise ChecksumMismatch(expected_sha256, actual)
    return total


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------
# walking a tree


def _walk(root: str, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Depth-first, name-sorted, never following symlinks: the order is
    what makes two packs of the same tree byte-identical."""
    with os.scandir(os.path.join(root, prefix) if prefix else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, rel + "/")


def _escapes(normalised: str) -> bool:
    return normalised == ".." or normalised.startswith("../") or normalised.startswith("/")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


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
            for rel, st in _walk(root, "/".join(parts) + "/"):
                chosen.setdefault(rel, st)
    # Component-wise order equals _walk's order: parents first, siblings by name.
    return dict(sorted(chosen.items(), key=lambda item: item[0].split("/")))


# --------------------------------------------------------------------------
# pack


def _portable_link(root_real: str, rel: str) -> str | None:
    """The symlink target to store, or None if the link leaves the tree.

    Links that only reach inside the tree by an absolute path or a detour
    through its parent are rewritten as the equivalent relative path, because
    the extracting side accepts nothing else and the absolute path means
    nothing on another machine."""
    path = os.path.join(root_real, rel)
    resolved = os.path.realpath(path)
    if not _inside(resolved, root_real):
        return None
    target = os.readlink(path)
    if not os.path.isabs(target):
        lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if not _escapes(lexical):
            return target
    return os.path.relpath(resolved, os.path.dirname(path))


# The ustar fields cr_queue never varies: magic, empty owner names, no device
# numbers (as Python 3.11's tarfile writes them for files), no prefix.
_USTAR_TAIL = b"ustar\x0000" + b"\0" * (64 + 16 + 155 + 12)
_PAX_HEADS: dict[int, bytes] = {}


def _ustar(name: bytes, mode: int, size: int, mtime: int, kind: bytes, link: bytes = b"") -> bytes:
    """One ustar header block, byte for byte what tarfile writes for our members."""
    block = b"".join(
        (
            name.ljust(100, b"\0"),
            b"%07o\0" % mode,
            b"0000000\0" b"0000000\0",  # uid, gid
            b"%011o\0" % size,
            b"%011o\0" % mtime,
            b"        ",  # the checksum counts itself as spaces
            kind,
            link.ljust(100, b"\0"),
            _USTAR_TAIL,
        )
    )
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    body = len(keyword) + len(value) + 3
    n = p = 0
    while True:  # the length field counts its own digits
        n = body + len(str(p))
        if n == p:
            break
        p = n
    return b"%d %s=%s\n" % (p, keyword, value)


def _header(rel: str, st: os.stat_result, kind: bytes, *, size: int = 0, link: str = "") -> bytes:
    """The member's header: built here for the common case (ASCII names that fit
    ustar, sizes below 8 GiB), by tarfile otherwise. Both give the same bytes
    (tests/test_archive.py checks), building it here is 7x faster, which is a
    fifth of packing a tree of small files."""
    mode = stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
    sec, ns = divmod(st.st_mtime_ns, 10**9)
    name = rel + "/" if kind == tarfile.DIRTYPE else rel
    if name.isascii() and link.isascii() and len(name) <= 100 and len(link) <= 100 and 0 <= size < 8**11 and 0 <= sec < 8**11:
        main = _ustar(name.encode(), mode, size, sec, kind, link.encode())
        if not ns:
            return main
        # What format(Decimal(mtime_ns).scaleb(-9), "f") gives for sec >= 0, at a tenth of the cost.
        records = _pax_record(b"mtime", b"%d.%09d" % (sec, ns))
        head = _PAX_HEADS.get(len(records))
        if head is None:
            head = _PAX_HEADS[len(records)] = _ustar(b"././@PaxHeader", 0, len(records), 0, tarfile.XHDTYPE)
        return head + records + bytes(-len(records) % _BLOCK) + main
    return _tarfile_header(rel, st, kind, size=size, link=link)


def _tarfile_header(rel: str, st: os.stat_result, kind: bytes, *, size: int = 0, link: str = "") -> bytes:
    info = tarfile.TarInfo(rel)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
    info.size = size
    info.linkname = link
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    sec, ns = divmod(st.st_mtime_ns, 10**9)
    info.mtime = sec
    if ns:
        # Exact nanoseconds: the worker compares (size, mtime_ns) snapshots.
        info.pax_headers = {"mtime": format(Decimal(st.st_mtime_ns).scaleb(-9), "f")}
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_compressors = threading.local()
# One read buffer per thread: a fresh zeroed megabyte per archive cost more
# than reading a small tomodir.
_buffers = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread, reused: a new one allocates its window
    again, and those fresh pages cost more than decompressing a small result."""
    found = getattr(_compressors, "decompressor", None)
    if found is None:
        found = _compressors.decompressor = zstandard.ZstdDecompressor()
    return found


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
        sink.write(_header(rel, st, tarfile.REGTYPE, size=size))
        view = memoryview(buf)
        left = size
        while left:
            n = f.readinto(view[: min(left, CHUNK)])
            if not n:
                raise ArchiveError(f"{path} shrank while it was being packed")
            sink.write(view[:n])
            left -= n
    pad = -size % _BLOCK
    if pad:
        sink.write(bytes(pad))
    return size


def pack(
    root: Path,
    out: Writable,
    *,
    members: Iterable[str] | None = None,
    level: int = 1,
    threads: int = 0,
) -> PackResult:
    """Stream a PAX tar of `root` through zstd into `out`, hashing the output.

    Owners are normalised to root and modes lose setuid/setgid so the
    receiving side never cares who packed the tree. Only directories, regular
    files and symlinks that stay inside `root` are stored; everything else is
    listed in `PackResult.skipped`. `threads` > 0 uses zstd's own worker
    threads (the output then differs from single-threaded output, but is
    still deterministic for the same settings)."""
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise NotADirectoryError(errno.ENOTDIR, "cannot pack: not a directory", str(root))
    entries: Iterable[tuple[str, os.stat_result]]
    entries = _walk(root_real) if members is None else _select(root_real, members).items()
    sink = _HashingWriter(out)
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


def _pack_into(compressor, sink, root_real: str, entries, result: PackResult, buf: bytearray) -> None:
    with compressor.stream_writer(sink, write_size=CHUNK, closefd=False) as zw:
        for rel, st in entries:
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                zw.write(_header(rel, st, tarfile.DIRTYPE))
            elif stat.S_ISREG(mode):
                result.raw_size += _pack_file(root_real, rel, zw, buf)
                result.manifest[rel] = (st.st_size, st.st_mtime_ns)
            elif stat.S_ISLNK(mode) and (target := _portable_link(root_real, rel)) is not None:
                zw.write(_header(rel, st, tarfile.SYMTYPE, link=target))
            else:
                result.skipped.append(rel)
                continue
            result.members += 1
        zw.write(bytes(2 * _BLOCK))


# --------------------------------------------------------------------------
# unpack


class _ForwardReader:
    """The decompressed stream as a forward-only file that tarfile can use
    in random-access mode ("r:").

    tarfile's stream mode ("r|") copies its whole read-ahead buffer on every
    512-byte header read (it halved extraction speed) and hides the stream
    position, which member data is taken from directly here. tarfile only
    seeks forward while iterating, so a backward seek means a malformed
    archive. Every read tarfile makes is checked against the end of the
    current member plus _MAX_HEADER *before* it happens: tarfile reads pax
    and long-name headers into memory whole.

    Decompression runs one block ahead in a thread (zstd releases the GIL),
    so it overlaps with writing files the way the two processes of
    `zstd -d | tar -x` do; the queue bounds the memory to a few blocks.

    Blocks are decompressed into buffers that are used again (a view from
    :meth:`take` is good until the next call): a fresh megabyte per block
    cost a page fault per 4 kB, as much CPU as the decompression itself."""

    def __init__(self, raw: BinaryIO, *, threaded: bool = True) -> None:
        self._queue: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue(maxsize=2)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._buffer: bytearray | None = None
        self._block = memoryview(b"")
        self._eof = False
        self.pos = 0
        self.boundary = 0
        self.last_member = ""
        self.truncated = False
        self._raw = raw
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._decompress, args=(raw,), name="unpack-zstd", daemon=True)
            self._thread.start()

    def _fill(self, raw: BinaryIO) -> tuple[bytearray, int]:
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = bytearray(CHUNK)
        return buffer, raw.readinto(buffer)

    def _decompress(self, raw: BinaryIO) -> None:
        try:
            while not self._stop.is_set():
                buffer, n = self._fill(raw)
                self._put((buffer, n))
                if not n:
                    return
        except BaseException as e:  # handed to the reading thread
            self._put(e)

    def _put(self, item: tuple[bytearray, int] | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def take(self, size: int) -> memoryview:
        """Up to `size` bytes without copying, good until the next call; empty at the end of the stream."""
        if not self._block and not self._eof:
            if self._buffer is not None:
                self._block.release()
                self._free.put(self._buffer)
            item = self._queue.get() if self._thread is not None else self._fill(self._raw)
            if isinstance(item, BaseException):
                raise item
            self._buffer, n = item
            self._eof = not n
            self._block = memoryview(self._buffer)[:n]
        view = self._block[:size]
        self._block = self._block[len(view) :]
        self.pos += len(view)
        return view

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        if size < 0 or self.pos + size > self.boundary + _MAX_HEADER:
            after = f"after {self.last_member!r}" if self.last_member else "at the start"
            raise UnsafeArchive(f"(header {after})", f"metadata larger than {_MAX_HEADER} bytes")
        pieces = []
        got = 0
        while got < size and (view := self.take(size - got)):
            pieces.append(bytes(view))
            got += len(view)
        # tarfile takes a short header read for the end of the archive, and
        # zstd does not complain about a cut-off frame: remember it.
        self.truncated = self.truncated or got < size
        return b"".join(pieces)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self.pos:
            raise ArchiveError("the archive needs a backward seek; it is not a plain tar stream")
        while self.pos < pos:
            if not self.take(pos - self.pos):
                raise EOFError("unexpected end of archive")
        return self.pos


def _parts(path: str, member: str, what: str) -> list[str]:
    if path.startswith("/"):
        raise UnsafeArchive(member, f"{what} {path!r} is an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(member, f"{what} {path!r} contains a '..' component")
    return parts


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

    def __init__(self, dest: Path, limits: Limits, reader: _ForwardReader, place: Place | None = None) -> None:
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
        parts = _parts(info.name, info.name, "name")
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
            self._settle(tmp, parent, parts, info.name)
        except BaseException:
            _discard(tmp, parent)
            raise

    def _settle(self, tmp: str, parent: int, parts: list[str], member: str) -> str | None:
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
        if _escapes(lexical):
            raise UnsafeArchive(info.name, f"symlink target {target!r} points outside the destination")
        parent = self._parent(parts, info.name)
        base = parts[-1]
        if self._place is None:
            self._replace_entry(lambda: os.symlink(target, base, dir_fd=parent), parent, base, info.name)
        else:
            tmp = _temporary_name()
            os.symlink(target, tmp, dir_fd=parent)
            try:
                placed = self._settle(tmp, parent, parts, info.name)
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
        target = _parts(info.linkname, info.name, "hard link target")
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
        if _inside(os.path.realpath(os.path.join(self._dest_real, name)), self._dest_real):
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
    limits: Limits | None = None,
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
    limits = default_limits if limits is None else limits
    dest.mkdir(parents=True, exist_ok=True)
    reader = _decompressor().stream_reader(
        src, read_size=CHUNK, read_across_frames=True, closefd=False
    )
    # A small archive is decompressed in this thread: the hand-over to a
    # second one cost more than it saved below a few blocks (retrieve of 100
    # one-megabyte tomodirs: docs/performance.md).
    forward = _ForwardReader(reader, threaded=(_size_of(src) if size is None else size) > _THREAD_ABOVE)
    try:
        extractor = _Extractor(dest, limits, forward, place)
        ok = False
        try:
            with tarfile.TarFile(fileobj=forward, mode="r") as tar:  # type: ignore[arg-type]
                while (info := tar.next()) is not None:
                    tar.members.clear()  # tarfile keeps every header otherwise
                    forward.boundary = info.offset_data + (info.size + -info.size % _BLOCK if info.isreg() else 0)
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


# --------------------------------------------------------------------------
# manifests


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every regular file: cheap to take, and enough to
    tell which files a solver wrote without hashing gigabytes."""
    return {
        rel: (st.st_size, st.st_mtime_ns)
        for rel, st in _walk(os.fspath(root))
        if stat.S_ISREG(st.st_mode)
    }


def changed_since(root: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """Files that are new or differ from `before`, plus empty directories
    that held no file in `before` (an empty inv/ must survive the trip
    back). Such a directory may already have existed empty; re-sending it is
    harmless, missing it is not."""
    changed: list[str] = []
    dirs: list[str] = []
    non_empty: set[str] = set()
    for rel, st in _walk(os.fspath(root)):
        non_empty.add(rel.rpartition("/")[0])
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
