"""The forward reader: a zstd stream decompressed one block ahead, read by tarfile as a file.

Unpacking reads every archive once, front to back; this module turns the
decompressed stream into what tarfile needs without the copies its stream
mode makes, and decompresses in a second thread where the archive is large
enough for that to pay (docs/performance.md, rounds three to five).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import BinaryIO

import zstandard

from cr_queue.tomodir.archive.errors import ArchiveError, UnsafeArchive
from cr_queue.tomodir.archive.sizes import CHUNK, MAX_HEADER

_decompressors = threading.local()


def decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread, reused: a new one allocates its window
    again, and those fresh pages cost more than decompressing a small result."""
    found = getattr(_decompressors, "decompressor", None)
    if found is None:
        found = _decompressors.decompressor = zstandard.ZstdDecompressor()
    return found


class ForwardReader:
    """The decompressed stream as a forward-only file that tarfile can use
    in random-access mode ("r:").

    tarfile's stream mode ("r|") copies its whole read-ahead buffer on every
    512-byte header read (it halved extraction speed) and hides the stream
    position, which member data is taken from directly here. tarfile only
    seeks forward while iterating, so a backward seek means a malformed
    archive. Every read tarfile makes is checked against the end of the
    current member plus MAX_HEADER *before* it happens: tarfile reads pax
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
        if size < 0 or self.pos + size > self.boundary + MAX_HEADER:
            after = f"after {self.last_member!r}" if self.last_member else "at the start"
            raise UnsafeArchive(f"(header {after})", f"metadata larger than {MAX_HEADER} bytes")
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

