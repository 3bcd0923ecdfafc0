"""Which crh_add or crh_retrieve works in a directory of tomodirs: one at a time.

Two crh_add on one tree registered every tomodir twice, and two crh_retrieve
tripped over each other's files beside the tomodirs.  Each run therefore holds
a PostgreSQL session advisory lock per directory holding its tomodirs (per
command and host), on a connection of its own named after it ("crh_add (pid N
on HOST)"), for as long as it runs; a killed run's locks go with its
connection.  A directory another run holds is left to that run, and the
message names it.

One lock per parent directory, not per tomodir: a tree of ten thousand
tomodirs would otherwise fill PostgreSQL's shared lock table (about 64 locks
per allowed connection), and two runs on one tree still meet in every
directory.

Through a transaction-pooling pooler (``[database] pooler = "transaction"``) a
session lock would outlive the run on a server connection the pooler shares;
the locks are then held by a transaction left open on the run's lock
connection instead (``session.try_transaction_locks``), which ends with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cr_queue.db.connection import is_pooled
from cr_queue.queries import jobs, session


def connection_name(command: str, actor: jobs.Actor) -> str:
    """The application_name of the connection holding a run's locks: what another run quotes."""
    return f"{command} (pid {actor.pid} on {actor.host})"


def take(conn, command: str, host: str, tomodirs: Sequence[Path]) -> list[str | None]:
    """Lock the directories holding ``tomodirs`` on ``conn`` (until it closes); for each
    tomodir, None when this run holds its directory, else who does (as
    :func:`connection_name` says it, or just the command where that cannot be seen)."""
    parents = [Path(os.path.abspath(td)).parent for td in tomodirs]
    keys = [_key(command, host, parent) for parent in parents]
    lock = session.try_transaction_locks if is_pooled(conn) else jobs.try_locks
    held = lock(conn, sorted(set(keys)))
    return [
        None if key not in held else (held[key] if held[key].startswith(f"{command} (") else command)
        for key in keys
    ]


def _key(command: str, host: str, directory: Path) -> int:
    """64 bits of a hash of what is locked, as PostgreSQL's advisory locks take."""
    return int.from_bytes(hashlib.sha256(f"{command}\0{host}\0{directory}".encode()).digest()[:8], "big", signed=True)
