"""The shared-directory store: archives as files every host mounts at the same path.

``[store] path = /users/data/crq`` in the config puts archives at
``<path>/<sha[:2]>/<sha>.tar.zst``, for groups whose database should not hold
terabytes.  This module knows files only: the ``blobs`` row each archive
still has (``location = 'dir'``) is the upload protocol's business
(upload.py), and which files garbage collection removes is garbage.py's.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar

from cr_queue.store.errors import BlobMissing, StoreUnavailable
from cr_queue.tomodir import archive

READ_SIZE = 1 << 20
SUFFIX = ".tar.zst"
TEMP_SUFFIX = ".part"


@dataclass
class DirectoryStore:
    """Archives as files ``<path>/<sha[:2]>/<sha>.tar.zst`` in a directory every host mounts."""

    path: Path
    source: str = "the config"
    location: ClassVar[str] = "dir"
    _checked: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def file_of(self, sha256: str) -> Path:
        return self.path / sha256[:2] / f"{sha256}{SUFFIX}"

    def check(self, *, write: bool = False) -> None:
        """Raise StoreUnavailable unless this host can read (and with write=True, write) the store."""
        mode = "write" if write else "read"
        if mode in self._checked:
            return
        need = os.R_OK | os.X_OK | (os.W_OK if write else 0)
        problem = None
        try:
            if not self.path.is_dir():
                problem = "it does not exist or is not a directory (not mounted here?)"
            elif not os.access(self.path, need):
                problem = f"this user ({_user()}) may not {mode} it"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem is not None:
            raise StoreUnavailable(
                errno.EACCES if "may not" in problem else errno.ENOENT,
                f"the archive store {self.path} ([store] path in {self.source}) cannot be used on host "
                f"{socket.gethostname()}: {problem}. Mount the shared directory on this host at the same path "
                f"and give the cr_queue users {'read and write' if write else 'read'} access to it, "
                "or remove [store] path from the config to keep archives in the database",
            )
        self._checked.add(mode)

    def new_file(self) -> ArchiveFile:
        """A file to write one archive into; it takes its place under the archive's hash at :meth:`ArchiveFile.place`."""
        self.check(write=True)
        return ArchiveFile(self)

    def read(self, sha256: str, dst: BinaryIO) -> int:
        """Copy the archive's file into ``dst``, verifying its sha256; the bytes copied."""
        self.check()
        path = self.file_of(sha256)
        try:
            fh = open(path, "rb", buffering=0)
        except FileNotFoundError:
            if not self.path.is_dir():  # the mount went away: this host's problem, not the job's
                self._checked.clear()
                self.check()
            raise BlobMissing(f"archive {sha256[:12]} is not in the store: {path} does not exist") from None
        with fh:
            return archive.copy_verified(iter(lambda: fh.read(READ_SIZE), b""), dst, sha256)


class ArchiveFile:
    """One archive being written into the directory store: whole or not at all.

    It is written under a temporary name in the store's top directory (the
    same filesystem, so the rename is atomic), fsynced, renamed into place and
    its directory fsynced: a reader sees a whole archive or none.
    """

    def __init__(self, store: DirectoryStore) -> None:
        self._store = store
        self._tmp = store.path / f".tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(
                exc.errno, f"cannot write to the archive store {store.path} on host {socket.gethostname()}: "
                f"{exc.strerror}; check that it is mounted read-write and has space"
            ) from exc
        self._fh = open(fd, "wb", buffering=0, closefd=True)

    def write(self, data) -> int:
        return self._fh.write(data)

    def flush(self) -> None:
        """Nothing is buffered here (the writes go straight to the file)."""

    def place(self, sha256: str, size: int) -> None:
        """Make the file durable and give it its name; identical content already there is kept."""
        try:
            os.fsync(self._fh.fileno())
            self._fh.close()
            final = self._store.file_of(sha256)
            final.parent.mkdir(exist_ok=True)
            if final.exists() and final.stat().st_size == size:
                self._tmp.unlink()  # the same content is already stored
            else:
                os.replace(self._tmp, final)
                _fsync_dir(final.parent)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - only for a message
        return str(os.getuid())
