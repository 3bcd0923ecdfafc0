"""A few files out of a stored archive, read in memory: never unpacked to disk.

The web's pictures need a handful of small files (elem.dat, the last
rhoNN.mag, inv.ctr, ...) out of archives that can be far larger (a CRMod
result with sensitivities is a gigabyte).  So the archive streams from the
store through a pipe into zstd and tarfile's stream mode, the wanted
members are kept in memory and everything else is skipped as it passes: the
memory held is the kept members plus a few blocks, whatever the archive's
size.  The store verifies the archive's sha256 as the bytes go by; when the
end shows a mismatch, what was read is thrown away and the error raised, so
nothing unverified is ever shown or cached.

:func:`copy_blob` is the only place that knows how to get an archive's
bytes out of the store.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
from collections.abc import Callable
from typing import BinaryIO

import psycopg
import zstandard

from cr_queue.db.connection import Database
from cr_queue.store import BlobMissing
from cr_queue.tomodir import archive

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A member larger than this is not kept (a log or a model is far smaller): it is reported as too large.
MAX_MEMBER = 64 << 20
# Of the solver's log only the end is kept, however long it is.
LOG_TAIL_BYTES = 16 << 10


class ArchiveUnreadable(Exception):
    """The archive cannot be read; the message says which and why."""


def copy_blob(database: Database, conn: psycopg.Connection, sha256: str, sink: BinaryIO) -> int:
    """Write the archive ``sha256`` into ``sink``, verified, as this login may read it.

    The web's one call into the store: the installation's store (the
    database, or a ``[store] path`` directory) reads the bytes the ``blobs``
    row points to, under the row-level security of the connection's login."""
    return database.store.fetch(conn, sha256, sink)


# Chooses which members to keep: a slot name and a rank for a member's name, or None to skip it.
# Of the members that fall into one slot the one with the highest rank is kept (the last
# iteration's model), so memory stays bounded however many iterations there are.
Select = Callable[[str], "tuple[str, int] | None"]


def read_members(fetch: Callable[[BinaryIO], int], select: Select, *, tails: frozenset[str] = frozenset()) -> dict[str, tuple[str, bytes]]:
    """The selected members of the archive that ``fetch`` writes: slot -> (member name, bytes).

    Slots in ``tails`` keep only the last :data:`LOG_TAIL_BYTES` of their member."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with open(write_fd, "wb", buffering=CHUNK) as sink:
                fetch(sink)
        except BaseException as exc:  # handed to the reading thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name="crh-web-archive", daemon=True)
    producer.start()
    found: dict[str, tuple[int, str, bytes]] = {}
    problem: BaseException | None = None
    with open(read_fd, "rb", buffering=CHUNK) as source:
        try:
            _scan(source, select, tails, found)
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError, ValueError) as exc:
            problem = exc
        finally:
            # Read to the end: the store checks the sha256 only once every byte has passed.
            while source.read(CHUNK):
                pass
            producer.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, (BlobMissing, archive.ChecksumMismatch)):
            raise ArchiveUnreadable(str(exc)) from None
        raise exc  # this host's trouble (a store not mounted, the database gone): not the archive's
    if problem is not None:
        raise ArchiveUnreadable(f"the archive is not a readable tar + zstd stream: {problem}")
    return {slot: (name, data) for slot, (_rank, name, data) in found.items()}


def _scan(source: BinaryIO, select: Select, tails: frozenset[str], found: dict[str, tuple[int, str, bytes]]) -> None:
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK, read_across_frames=True, closefd=False)
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            tar.members.clear()  # tarfile keeps every header otherwise
            if not info.isreg():
                continue
            name = info.name.removeprefix("./")
            chosen = select(name)
            if chosen is None:
                continue
            slot, rank = chosen
            if slot in found and found[slot][0] > rank:
                continue
            fh = tar.extractfile(info)
            if fh is None:
                continue
            if slot in tails:
                found[slot] = (rank, name, _tail(fh, info.size))
            elif info.size <= MAX_MEMBER:
                found[slot] = (rank, name, fh.read())
            else:
                log.warning("%s is %d bytes, more than the %d a picture reads: skipped", name, info.size, MAX_MEMBER)


def _tail(fh: BinaryIO, size: int) -> bytes:
    skip = max(0, size - LOG_TAIL_BYTES)
    while skip:
        step = fh.read(min(skip, CHUNK))
        if not step:
            break
        skip -= len(step)
    return fh.read()
