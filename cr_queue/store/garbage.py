"""Garbage collection of archives: rows and chunks no job needs, and the directory store's files.

``crh_cleanup`` calls :func:`collect_garbage`, first with ``dry_run`` for
its plan, then with the planned ids to delete them.  What counts as garbage
is one statement, ``garbage`` of blobs.sql: the plan lists its rows and the
deletion deletes the rows it returns (locked) among the planned ids, so
``--dry-run`` shows exactly what is deleted, less whatever a job took up
meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from cr_queue.queries import blobs
from cr_queue.queries.blobs import Garbage
from cr_queue.store.choice import Store
from cr_queue.store.directory import SUFFIX, TEMP_SUFFIX, DirectoryStore


@dataclass
class GarbageReport:
    blobs: int = 0  # blob rows removed (database chunks went with them)
    bytes: int = 0  # compressed bytes freed, both stores
    files: int = 0  # files removed from the directory store
    orphan_files: int = 0  # of those, files no row knew about
    temp_files: int = 0  # abandoned uploads (.part) removed
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)
    rows: list[Garbage] = field(default_factory=list)  # the archives removed (or, dry run, to remove)


def collect_garbage(
    conn: psycopg.Connection,
    where: Store,
    *,
    min_age_s: float = 3600.0,
    stale_upload_s: float = 86400.0,
    dry_run: bool = False,
    batch: int = 1000,
    ids: Sequence[int] | None = None,
    doomed: Sequence[int] = (),
    released: Sequence[str] = (),
) -> GarbageReport:
    """Delete archives no job needs any more, from the database and the store ``where``.

    * complete archives referenced by no job (input or result; the jobs in
      ``doomed`` not counted) that a job released in this run (``released``:
      their hashes) or that were sealed more than ``min_age_s`` ago (an
      archive is unreferenced for a moment between its upload and the
      statement that names it);
    * incomplete uploads older than ``stale_upload_s`` (an interrupted
      crh_add or worker);
    * only those of ``ids``, when given (crh_cleanup deletes what it planned);
    * when ``where`` is a directory store: files of those archives, files no
      ``blobs`` row knows (older than ``min_age_s``), and abandoned ``.part``
      files older than ``stale_upload_s``.

    A dry run lists every archive at once.  Otherwise rows are chosen and
    deleted in batches of ``batch``, each one short transaction that holds
    the chosen rows locked until they are gone, and a file is removed only
    after its row, so a reader never finds a row whose file was removed.
    Returns what was (or with ``dry_run`` would be) removed.
    """
    directory = where if isinstance(where, DirectoryStore) else None
    report = GarbageReport(dry_run=dry_run)
    pending = None if ids is None else sorted(set(ids))
    while pending is None or pending:
        chosen = None if pending is None else pending[:batch]
        with conn.transaction():
            rows = blobs.garbage(
                conn,
                grace_s=min_age_s,
                stale_s=stale_upload_s,
                doomed=doomed,
                released=released,
                ids=chosen,
                limit=None if dry_run else batch,
            )
            if rows and not dry_run:
                blobs.delete_garbage(conn, [r.id for r in rows])
        for row in rows:
            report.rows.append(row)
            report.blobs += 1
            report.bytes += row.bytes or 0
            if row.location == "dir" and directory is not None and row.sha256:
                _remove_file(directory.file_of(row.sha256), report, dry_run)
        if pending is not None:
            pending = pending[batch:]
        elif dry_run or len(rows) < batch:
            break
    if directory is not None:
        _sweep_directory(conn, directory, report, min_age_s, stale_upload_s, dry_run)
    return report


def _remove_file(path: Path, report: GarbageReport, dry_run: bool) -> None:
    try:
        if not dry_run:
            path.unlink()
        report.files += 1
    except FileNotFoundError:
        pass
    except OSError as exc:
        report.errors.append(f"cannot remove {path}: {exc.strerror or exc}")


def _sweep_directory(
    conn: psycopg.Connection, directory: DirectoryStore, report: GarbageReport, min_age_s: float, stale_s: float, dry_run: bool
) -> None:
    """Files no row knows (older than ``min_age_s``) and abandoned uploads (older than ``stale_s``)."""
    directory.check(write=not dry_run)
    now = time.time()
    for entry in os.scandir(directory.path):
        if entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
            if now - entry.stat(follow_symlinks=False).st_mtime > stale_s:
                _remove_file(Path(entry.path), report, dry_run)
                report.temp_files += 1
            continue
        if len(entry.name) != 2 or not entry.is_dir(follow_symlinks=False):
            continue
        candidates: dict[str, tuple[Path, int]] = {}
        for f in os.scandir(entry.path):
            if not f.name.endswith(SUFFIX) or not f.is_file(follow_symlinks=False):
                continue
            st = f.stat(follow_symlinks=False)
            if now - st.st_mtime > min_age_s:
                candidates[f.name[: -len(SUFFIX)]] = (Path(f.path), st.st_size)
        if not candidates:
            continue
        known = blobs.known(conn, list(candidates))
        for sha, (path, size) in candidates.items():
            if sha not in known:
                _remove_file(path, report, dry_run)
                report.orphan_files += 1
                report.bytes += size
