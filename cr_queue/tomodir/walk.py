"""The one directory walker: discovery, control files, packing and manifests go through it.

Depth-first, siblings in name order, every directory before what it holds,
and never through a symlink.  The order makes two packs of the same tree
byte-identical; not following links keeps a link loop, or a link to a shared
data store, from pulling unrelated files into a job or a search.  What to
skip (hidden directories, the inside of a tomodir) and what a directory that
cannot be read means (an error, a line in a report) is the caller's choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

Descend = Callable[[str, os.DirEntry], bool]
"""``descend(rel, entry)``: whether to walk into the directory ``entry`` (at ``rel``)."""
OnError = Callable[[OSError], None]
"""``onerror(exc)``: a directory could not be listed (``exc.filename`` names it); raise to stop."""


def walk(
    top: str | os.PathLike[str],
    *,
    descend: Descend | None = None,
    onerror: OnError | None = None,
) -> Iterator[tuple[str, os.DirEntry]]:
    """Every entry below ``top`` as ``(rel, entry)``, ``rel`` joined with "/".

    Directories (not symlinks to them) are walked into unless ``descend``
    says no; a directory that cannot be listed raises, or goes to ``onerror``
    and the walk goes on."""
    return _walk(top, "", descend, onerror)


def _walk(
    directory: str | os.PathLike[str], prefix: str, descend: Descend | None, onerror: OnError | None
) -> Iterator[tuple[str, os.DirEntry]]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=_name)
    except OSError as exc:
        if onerror is None:
            raise
        onerror(exc)
        return
    for entry in entries:
        rel = prefix + entry.name
        yield rel, entry
        if entry.is_dir(follow_symlinks=False) and (descend is None or descend(rel, entry)):
            yield from _walk(entry.path, rel + "/", descend, onerror)


def _name(entry: os.DirEntry) -> str:
    return entry.name


def not_hidden(rel: str, entry: os.DirEntry) -> bool:
    """The ``descend`` of searches in a user's tree: no .git, .snapshot or our own temporary directories."""
    return not entry.name.startswith(".")
