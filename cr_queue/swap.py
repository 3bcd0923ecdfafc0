"""Replacing a directory in one step, so that a retrieval is all or nothing.

The retrieved tomodir is built beside the original as a hard-link copy (cheap:
no file data is copied, and the user's files keep their inodes) plus the
results, then the two directories are exchanged atomically with Linux's
``renameat2(RENAME_EXCHANGE)``.  Where the filesystem cannot do that (NFS,
other kernels) callers fall back to moving files one by one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):
    _renameat2 = None


class SwapUnsupported(Exception):
    """This filesystem or kernel cannot exchange directories atomically."""


def exchange(a: Path, b: Path) -> None:
    """Atomically swap the directory entries ``a`` and ``b``."""
    if _renameat2 is None:
        raise SwapUnsupported("renameat2 is not available")
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise SwapUnsupported(os.strerror(err))
        raise OSError(err, os.strerror(err), str(a))


def link_copy(src: Path, dst: Path) -> None:
    """Recreate ``src`` at ``dst`` with directories copied and files hard-linked.

    Raises SwapUnsupported when hard links cannot be made here.  Entries that
    are neither files, directories nor symlinks are left out; the caller puts
    back whatever the copy lacks after the exchange.
    """
    dst.mkdir(mode=0o700)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target_dir = dst / rel
        for name in dirnames:
            source = Path(dirpath) / name
            if source.is_symlink():
                os.symlink(os.readlink(source), target_dir / name)
            else:
                (target_dir / name).mkdir()
        for name in filenames:
            source = Path(dirpath) / name
            if source.is_symlink():
                os.symlink(os.readlink(source), target_dir / name)
            elif source.is_file():
                try:
                    os.link(source, target_dir / name)
                except OSError as exc:
                    if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP):
                        raise SwapUnsupported(f"cannot hard-link {source}: {exc.strerror}") from exc
                    raise
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    for dirpath, _dirnames, _filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        shutil.copystat(dirpath, dst / rel, follow_symlinks=False)


def reconcile(old: Path, current: Path) -> list[str]:
    """After an exchange: keep anything only the old tree has, then remove the old tree.

    Something only the old tree holds was created while the new one was
    being built (or could not be linked); it belongs to the user and is moved
    into the current tree.  Returns the relative paths that were moved back.
    """
    moved: list[str] = []
    for dirpath, dirnames, filenames in os.walk(old):
        rel_dir = Path(dirpath).relative_to(old)
        for name in list(dirnames) + filenames:
            rel = rel_dir / name
            target = current / rel
            if not os.path.lexists(target):
                os.replace(Path(dirpath) / name, target)
                moved.append(rel.as_posix())
                if name in dirnames:
                    dirnames.remove(name)
    shutil.rmtree(old, ignore_errors=True)
    return moved
