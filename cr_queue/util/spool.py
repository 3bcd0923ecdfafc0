"""Where a download waits until its sha256 is known, before anything unpacks it.

Up to a limit the bytes stay in memory, in a buffer each thread keeps for its
next download: a fresh buffer per archive cost a page fault for every 4 kB,
and on a virtual machine that hands freed memory back to its host those are
dear (crh_retrieve of 100 results spent as much CPU on them as on zstd).
Past the limit the download goes on in an unnamed file in the directory the
caller chose."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

# The buffer a thread's last spool left behind, for its next one.
_kept = threading.local()


class Spool:
    """A writable for a download; :meth:`source` gives it back for unpacking.

    The memory is this spool's from creation until :meth:`close`, and the
    thread's again afterwards: a view from :meth:`source` is not to be used
    after closing."""

    def __init__(self, limit: int, directory: Path, prefix: str) -> None:
        self._limit = limit
        self._directory = directory
        self._prefix = prefix
        self._memory: bytearray = getattr(_kept, "memory", None) or bytearray()
        _kept.memory = None  # a second spool on this thread gets its own
        self._size = 0
        self._file: BinaryIO | None = None

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        end = self._size + n
        if self._file is None and end > self._limit:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix=self._prefix)
            self._file.write(memoryview(self._memory)[: self._size])
        if self._file is not None:
            self._file.write(data)
        else:
            if end > len(self._memory):
                # A new buffer rather than a resize, which a view of the old one would forbid.
                grown = bytearray(min(max(end, 2 * len(self._memory)), self._limit))
                grown[: self._size] = memoryview(self._memory)[: self._size]
                self._memory = grown
            self._memory[self._size : end] = data
        self._size = end
        return n

    def __len__(self) -> int:
        return self._size

    def source(self) -> memoryview | BinaryIO:
        """The bytes written, from the start: a view of the memory, or the file."""
        if self._file is None:
            return memoryview(self._memory)[: self._size]
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._memory:
            _kept.memory = self._memory
            self._memory = bytearray()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
