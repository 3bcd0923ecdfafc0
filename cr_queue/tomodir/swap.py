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
import stat
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
    back whatever the copy lacks after the exchange.  The walk works on
    directory descriptors and the types readdir reports, because a retrieval
    does this for every tomodir: per entry one link or mkdir, nothing more
    (a pathname walk with a stat per entry doubled its cost).
    """
    os.mkdir(dst, 0o700)
    src_fd = os.open(src, _DIR_FLAGS)
    try:
        dst_fd = os.open(dst, _DIR_FLAGS)
        try:
            _link_tree(src_fd, dst_fd, src)
            _copy_dir_stat(src_fd, dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_UNLINKABLE = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP)


def _link_tree(src_fd: int, dst_fd: int, where: Path) -> None:
    with os.scandir(src_fd) as entries:
        listed = list(entries)
    for entry in listed:
        name = entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            sub_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                try:
                    _link_tree(sub_src, sub_dst, where / name)
                    _copy_dir_stat(sub_src, sub_dst)
                finally:
                    os.close(sub_dst)
            finally:
                os.close(sub_src)
        elif entry.is_file(follow_symlinks=False):
            try:
                os.link(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in _UNLINKABLE:
                    raise SwapUnsupported(f"cannot hard-link {where / name}: {exc.strerror}") from exc
                raise


def _copy_dir_stat(src_fd: int, dst_fd: int) -> None:
    """Mode, times and extended attributes (ACLs among them), as shutil.copystat would."""
    st = os.fstat(src_fd)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
            raise
        names = []
    for attr in names:
        try:
            os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
                raise
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def reconcile(old: Path, current: Path) -> list[str]:
    """After an exchange: keep anything only the old tree has, then remove the old tree.

    Something only the old tree holds was created while the new one was
    being built (or could not be linked); it belongs to the user and is moved
    into the current tree.  Returns the relative paths that were moved back.
    One pass: each directory of the old tree is listed beside its namesake
    in the current one, and what both hold is removed from the old.
    """
    moved: list[str] = []
    try:
        old_fd = os.open(old, _DIR_FLAGS)
    except FileNotFoundError:
        return moved
    try:
        cur_fd = os.open(current, _DIR_FLAGS)
        try:
            _drain(old_fd, cur_fd, "", moved)
        finally:
            os.close(cur_fd)
    finally:
        os.close(old_fd)
    os.rmdir(old)
    return moved


def _drain(old_fd: int, cur_fd: int, rel: str, moved: list[str]) -> None:
    """Empty the old directory ``old_fd``, moving what ``cur_fd`` lacks into it."""
    with os.scandir(cur_fd) as entries:
        here = {e.name for e in entries}
    with os.scandir(old_fd) as entries:
        listed = list(entries)
    for entry in listed:
        name = entry.name
        path = f"{rel}{name}"
        if name not in here:
            os.rename(name, name, src_dir_fd=old_fd, dst_dir_fd=cur_fd)
            moved.append(path)
        elif entry.is_dir(follow_symlinks=False):
            sub_cur = _open_dir_or_none(name, cur_fd)
            if sub_cur is None:
                # The current tree holds something else under this name: keep the directory beside it.
                kept = f"{name}.crh-old"
                os.rename(name, kept, src_dir_fd=old_fd, dst_dir_fd=cur_fd)
                moved.append(f"{rel}{kept}")
                continue
            sub_old = os.open(name, _DIR_FLAGS, dir_fd=old_fd)
            try:
                _drain(sub_old, sub_cur, f"{path}/", moved)
            finally:
                os.close(sub_old)
                os.close(sub_cur)
            os.rmdir(name, dir_fd=old_fd)
        else:
            os.unlink(name, dir_fd=old_fd)


def _open_dir_or_none(name: str, parent_fd: int) -> int | None:
    """The current tree's directory of that name; None where it holds something else there."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ENOENT, errno.ELOOP):
            return None
        raise
