"""What can go wrong with an archive, as the commands report it."""

from __future__ import annotations


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
