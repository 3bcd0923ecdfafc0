"""Which store an installation keeps its archives in, chosen when a command opens the database.

The database (default) or the directory of ``[store] path``;
``cr_queue.database.open_database`` asks :func:`configured` first, the
:class:`~cr_queue.db.connection.Database` it returns carries the choice,
and whoever uploads or fetches is handed it from there.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar, Union

from cr_queue import config
from cr_queue.db.connection import DatabaseError
from cr_queue.store.directory import DirectoryStore
from cr_queue.store.errors import StoreUnavailable


@dataclasses.dataclass(frozen=True)
class DatabaseStore:
    """Archives as 1 MiB chunks in ``binary_data``: one service to run and back up."""

    location: ClassVar[str] = "db"


DATABASE = DatabaseStore()

# Where new archives go.  Reading follows each archive's row, so archives
# written before a directory store was configured stay readable.
Store = Union[DatabaseStore, DirectoryStore]


def from_settings(raw: dict, *, source: str = "the config") -> Store:
    """The store an installation configured: ``[store] path`` or the database."""
    table = raw.get("store") if isinstance(raw, dict) else None
    path = table.get("path") if isinstance(table, dict) else None
    if path is None:
        return DATABASE
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"[store] path in {source} must be a non-empty string (a directory every host can see)")
    return DirectoryStore(Path(os.path.expanduser(path)), source=source)


def configured(settings: config.Settings) -> Store:
    """The store of ``settings``, checked: a directory this host cannot read stops the
    command (a DatabaseError: exit 2, the path, the host and the remedy) before any
    job is touched."""
    where = str(settings.config_path) if settings.config_path else "the config"
    try:
        chosen = from_settings(settings.raw, source=where)
        if isinstance(chosen, DirectoryStore):
            chosen.check()
    except (ValueError, StoreUnavailable) as exc:
        raise DatabaseError(str(exc)) from None
    return chosen
