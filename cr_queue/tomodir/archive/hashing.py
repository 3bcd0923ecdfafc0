"""sha256 in the same pass that moves the bytes: archives are hashed as they are written or read.

The sha256 always covers the *compressed* bytes, because that is what the
store keeps and what every hop must verify before unpacking.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from typing import BinaryIO, Protocol

from cr_queue.tomodir.archive.errors import ChecksumMismatch


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class HashingWriter:
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
