"""Local mode: add, run the jobs on this machine, retrieve — one command (cr_hydra's --with-local_inv).

The jobs go into a fresh private group, so remote workers never take them
and the local worker takes nothing else; it quits when that group is done.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cr_queue import add, retrieve
from cr_queue.solvers import solvers
from cr_queue import worker
from cr_queue.db.connection import Database
from cr_queue.tomodir import archive


@dataclass
class LocalRun:
    group: str
    added: add.AddReport
    worker: worker.Worker
    retrieved: retrieve.RetrieveReport


def run_local(
    db: Database,
    paths: Iterable[Path],
    options: add.AddOptions,
    solver_map: dict[str, solvers.Solver],
    *,
    limits: archive.Limits,
    jobs: int = 1,
    threads: int = 1,
    found=None,
    on_added: Callable[[add.Added], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    on_retrieved: Callable[[retrieve.Item], None] | None = None,
) -> LocalRun:
    paths = [Path(p) for p in paths]
    group = f"local-{uuid.uuid4().hex[:12]}"
    options = add.AddOptions(**{**options.__dict__, "group": group})
    added = add.add(db, paths, options, progress=on_added, found=found)
    w = worker.Worker(
        db,
        solver_map,
        worker.WorkerOptions(jobs=jobs, threads=threads, quit_when_empty=True, groups=(group,), name=group),
        limits=limits,
        on_event=on_event,
    )
    if added.added:
        w.run()
    got = (
        retrieve.retrieve(db, [a.path for a in added.added], limits=limits, progress=on_retrieved)
        if added.added
        else retrieve.RetrieveReport()
    )
    return LocalRun(group, added, w, got)
