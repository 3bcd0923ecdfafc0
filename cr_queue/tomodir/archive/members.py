"""Which paths an archive member may have: relative, and inside the tree it belongs to."""

from __future__ import annotations

import os

from cr_queue.tomodir.archive.errors import UnsafeArchive


def escapes(normalised: str) -> bool:
    """Whether a normalised relative path leaves its tree."""
    return normalised == ".." or normalised.startswith("../") or normalised.startswith("/")


def inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def parts(path: str, member: str, what: str) -> list[str]:
    """A member's path (or link target) as its components; absolute paths and '..' are refused."""
    if path.startswith("/"):
        raise UnsafeArchive(member, f"{what} {path!r} is an absolute path")
    found = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in found:
        raise UnsafeArchive(member, f"{what} {path!r} contains a '..' component")
    return found
