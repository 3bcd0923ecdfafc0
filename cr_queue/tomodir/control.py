"""The `.crh` control file written beside each registered tomodir.

It is the only link between a directory on the user's disk and its job in
the database, so it must never be half-written and, when damaged, must say
what to do instead of failing with a traceback.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cr_queue.tomodir.walk import not_hidden, walk
from cr_queue.util.pause import pause_point

SUFFIX = ".crh"
VERSION = 1

_REMEDY = "delete it and run crh_add again if the job is lost, or restore it from a backup"


class ControlFileError(Exception):
    """A control file is missing, unreadable or malformed."""


@dataclass
class ControlFile:
    job_id: int
    sim_type: str
    crh_file: str
    tomodir: str
    source_computer: str
    username: str
    datetime_init: str  # ISO 8601
    archive_sha256: str
    manifest: dict[str, list[int]] = field(default_factory=dict)  # path -> [size, mtime_ns]
    version: int = VERSION


def control_path(tomodir: Path | str) -> Path:
    """`/data/site/td_01/` -> `/data/site/td_01.crh`; made absolute first so
    that "." and trailing slashes still name the directory itself."""
    absolute = Path(os.path.abspath(tomodir))
    if absolute.parent == absolute:
        raise ControlFileError(f"{tomodir}: the file system root cannot be a tomodir")
    return absolute.with_name(absolute.name + SUFFIX)


def write(cf: ControlFile, path: Path | str) -> None:
    """Write atomically: a crash leaves the old file or the new one, never a
    torn one, because a lost .crh means a result nobody can retrieve."""
    path = Path(path)
    data = render(cf).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        pause_point("add:control_tmp")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_TMP_SUFFIX = ".tmp"
# What write() names its temporary file: .NAME.crh.<12 hex digits>.tmp
_TMP_NAME = re.compile(r"^\.(?P<crh>.+\.crh)\.[0-9a-f]{12}\.tmp$")


def remove_leftovers(tomodirs: Iterable[Path]) -> None:
    """Remove the temporary ``.crh`` files a killed crh_add left beside these tomodirs.

    Only a crh_add that holds the tomodirs' registration locks calls this, so no
    other process is writing one of them; each parent directory is listed once."""
    by_parent: dict[Path, set[str]] = {}
    for td in tomodirs:
        by_parent.setdefault(td.parent, set()).add(control_path(td).name)
    for parent, names in by_parent.items():
        try:
            with os.scandir(parent) as entries:
                stale = [e.name for e in entries if (m := _TMP_NAME.match(e.name)) and m["crh"] in names]
        except OSError:
            continue
        for name in stale:
            (parent / name).unlink(missing_ok=True)


def special_kind(path: Path) -> str:
    """What a tomodir entry that is not packed is, in words (crh_add names it so)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "an entry that vanished while it was packed"
    if stat.S_ISLNK(mode):
        return "a symlink pointing outside the tomodir"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "neither a file, a directory nor a symlink"


def render(cf: ControlFile) -> str:
    """The file's text: what ``json.dumps(asdict(cf), indent=2)`` gives, built from
    json's C encoder one value at a time (with an indent, json falls back to its
    pure-Python encoder, and asdict deep-copies the manifest: together a third
    of crh_add's own work on a tree of small tomodirs)."""
    lines = []
    for f in fields(ControlFile):
        value = getattr(cf, f.name)
        if f.name == "manifest":
            if value:
                entries = ",\n".join(
                    f"    {json.dumps(rel)}: [\n      {entry[0]},\n      {entry[1]}\n    ]" for rel, entry in value.items()
                )
                lines.append(f'  "manifest": {{\n{entries}\n  }}')
            else:
                lines.append('  "manifest": {}')
        else:
            lines.append(f"  {json.dumps(f.name)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check(path: Path, key: str, value: Any, expected: type) -> None:
    # bool is an int subclass; true/false is never a valid job id or size.
    if isinstance(value, bool) or not isinstance(value, expected):
        raise ControlFileError(
            f"{path}: key {key!r} must be {expected.__name__}, not {_type_name(value)}; {_REMEDY}"
        )


def _manifest(path: Path, value: Any) -> dict[str, list[int]]:
    _check(path, "manifest", value, dict)
    for name, entry in value.items():
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
        ):
            raise ControlFileError(
                f"{path}: manifest entry {name!r} must be [size, mtime_ns], not {entry!r}; {_REMEDY}"
            )
    return value


def read(path: Path | str) -> ControlFile:
    """Parse and validate; keys this version does not know are ignored so an
    older cr_queue can still read files from a newer one of the same
    format version."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ControlFileError(f"{path}: control file does not exist; run crh_add to register the directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ControlFileError(f"{path}: cannot read control file ({e}); {_REMEDY}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ControlFileError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); {_REMEDY}"
        ) from None
    if not isinstance(data, dict):
        raise ControlFileError(f"{path}: expected a JSON object, found {_type_name(data)}; {_REMEDY}")
    version = data.get("version", VERSION)
    _check(path, "version", version, int)
    if version > VERSION:
        raise ControlFileError(
            f"{path}: written by a newer cr_queue (format version {version}, this one reads {VERSION}); "
            "upgrade cr_queue to use it"
        )
    if "job_id" not in data and "sim_id" in data:
        raise ControlFileError(
            f"{path}: written by cr_hydra (job {data['sim_id']}), not by cr_queue. Retrieve it with "
            "cr_hydra's crh_retrieve against the old database, and do not delete it: cr_hydra removed "
            "the input after upload, so its database may hold the only copy "
            "(see docs/migrating-from-cr_hydra.md)"
        )
    values: dict[str, Any] = {}
    for f in fields(ControlFile):
        if f.name == "version":
            continue
        if f.name not in data:
            raise ControlFileError(f"{path}: missing key {f.name!r}; {_REMEDY}")
        value = data[f.name]
        if f.name == "manifest":
            values[f.name] = _manifest(path, value)
        else:
            _check(path, f.name, value, int if f.name == "job_id" else str)
            values[f.name] = value
    return ControlFile(**values, version=version)


def find(paths: Iterable[Path | str]) -> list[Path]:
    """Every control file under the given directories, or the given .crh
    files themselves.

    A directory that is itself a registered tomodir also yields its sibling
    control file, so `crh_retrieve` run inside a tomodir (or naming one)
    finds that tomodir's job. Directory symlinks are not followed, to avoid
    loops and collecting the same job twice; hidden directories are
    skipped."""
    found: dict[str, Path] = {}
    for given in paths:
        given = Path(given)
        if not os.path.lexists(given):
            raise ControlFileError(f"{given}: no such file or directory")
        if given.is_dir():
            sibling = control_path(given)
            if sibling.is_file():
                found.setdefault(os.path.abspath(sibling), sibling)
            for crh in _below(given):
                found.setdefault(os.path.abspath(crh), crh)
        elif given.name.endswith(SUFFIX):
            found.setdefault(os.path.abspath(given), given)
        else:
            raise ControlFileError(f"{given}: neither a directory nor a {SUFFIX} control file")
    return sorted(found.values())


def _below(top: Path) -> Iterable[Path]:
    def fail(error: OSError) -> None:
        raise ControlFileError(
            f"{error.filename}: cannot search for control files ({error.strerror}); "
            "fix the permissions or name the directories to search"
        )

    for _rel, entry in walk(top, descend=not_hidden, onerror=fail):
        if entry.name.endswith(SUFFIX) and entry.is_file():
            yield Path(entry.path)


@dataclass
class Found:
    """The control files below some paths, each read: where crh_retrieve,
    ``crh_status --tree`` and the commands that take job targets start."""

    files: list[tuple[Path, ControlFile | None]] = field(default_factory=list)  # None: unreadable, see problems
    problems: list[str] = field(default_factory=list)

    @property
    def readable(self) -> list[tuple[Path, ControlFile]]:
        return [(path, cf) for path, cf in self.files if cf is not None]


def gather(paths: Iterable[Path | str]) -> Found:
    """:func:`find` the control files and :func:`read` each; a file that cannot be
    read, or a search that fails, is one line in ``problems``, not an exception."""
    found = Found()
    try:
        crh_files = find(paths)
    except ControlFileError as exc:
        found.problems.append(str(exc))
        return found
    for crh in crh_files:
        try:
            found.files.append((crh, read(crh)))
        except ControlFileError as exc:
            if not os.path.lexists(crh):
                continue  # gone since the search: another crh_retrieve brought that tomodir back
            found.files.append((crh, None))
            found.problems.append(str(exc))
    return found


def remove(path: Path | str) -> None:
    """Idempotent, because a retrieval interrupted after removing the file
    is retried."""
    Path(path).unlink(missing_ok=True)
