"""The crh_add workflow: find the tomodirs, start the packers, register them.

This module is where crh_add starts, so it imports no database driver: a
command finds its tomodirs (:func:`find`), then :func:`run` forks the
helper processes that pack them (packers.py) and only then opens the
database, whose driver's import is most of crh_add's start-up; the
registrations themselves are registration.py's (one tomodir, in the order
that makes a crash harmless) and parallel_registration.py's (many at once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cr_queue import packers
from cr_queue.tomodir import control
from cr_queue.tomodir import discover
from cr_queue.util.imports import load_module

if TYPE_CHECKING:
    from cr_queue.db.connection import Database


@dataclass(frozen=True)
class AddOptions:
    force: bool = False
    dry_run: bool = False
    priority: int = 0
    group: str | None = None
    threads: int = 1
    timeout_s: int | None = None
    max_attempts: int = 3


@dataclass
class Added:
    path: Path
    job_id: int | None
    sim_type: str
    steps: tuple[str, ...]
    size: int = 0
    resumed: bool = False


@dataclass
class AddReport:
    added: list[Added] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    done: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Ctrl-C: the run stopped early; the tomodirs whose jobs it left 'registering'
    # (path, job id: the next crh_add resumes them) and how many it never began.
    interrupted: bool = False
    left_registering: list[tuple[Path, int]] = field(default_factory=list)
    not_begun: int = 0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED
        return 1 if self.problems else 0


# The exit status of a command stopped by Ctrl-C (128 + SIGINT, as the shell reports it).
INTERRUPTED = 130


_REGISTERING = "cr_queue.parallel_registration"


def find(paths: Iterable[Path]) -> discover.Discovery:
    """The tomodirs below ``paths`` and what each needs (nothing is registered yet)."""
    return discover.discover([Path(p) for p in paths])


def run(
    found: discover.Discovery,
    paths: Iterable[Path],
    options: AddOptions,
    *,
    open_database: Callable[[], Database],
    progress: Callable[[Added], None] | None = None,
    may_fork: bool = False,
) -> AddReport:
    """Register what :func:`find` found, as the crh_add command does.

    ``may_fork``: this is a console script's own process, with no thread yet,
    so the packers may be forked (they start packing while this process
    imports the database driver and connects: ``open_database()``)."""
    if options.dry_run or not found.todo:
        # Nothing to register: the report of what would be (or is already) done.  A .crh
        # among them needs the database to tell a registration the rerun resumes.
        db = open_database() if options.dry_run and _any_control_file(found.todo) else None
        return add(db, paths, options if options.dry_run else AddOptions(dry_run=True), found=found)
    helpers = packers.start(found.todo, force=options.force, processes=packers.default_processes()) if may_fork else None
    try:
        # The database driver and the store, imported now that the packers run (util/imports.py).
        load_module(_REGISTERING)
        return add(open_database(), paths, options, found=found, helpers=helpers, progress=progress)
    finally:
        if helpers is not None:
            helpers.close()


def _any_control_file(todo) -> bool:
    return any(control.control_path(td.path).exists() for td in todo)


def add(
    db: Database | None,
    paths: Iterable[Path],
    options: AddOptions,
    *,
    progress: Callable[[Added], None] | None = None,
    found: discover.Discovery | None = None,
    helpers: packers.Packers | None = None,
) -> AddReport:
    """Register the tomodirs below ``paths`` (``db`` may be None for a dry run).
    ``helpers``: what :func:`packers.start` forked for the same ``found.todo``
    and ``options.force`` (the caller closes it)."""
    found = found if found is not None else find(paths)
    report = AddReport(done=list(found.done))
    report.problems.extend(found.errors)
    report.problems.extend(inc.message for inc in found.incomplete)
    if options.dry_run:
        resumable = load_module(_REGISTERING).resumable(db, found.todo) if db is not None and not options.force else {}
        for td in found.todo:
            crh = control.control_path(td.path)
            if td.path.resolve() in resumable:
                added = Added(td.path.resolve(), resumable[td.path.resolve()], td.sim_type, td.steps, resumed=True)
                report.added.append(added)
            elif crh.exists() and not options.force:
                report.skipped.append((td.path, f"{crh.name} exists: already registered"))
            else:
                report.added.append(Added(td.path.resolve(), None, td.sim_type, td.steps))
        return report
    assert db is not None, "only a dry run goes without a database"
    return load_module(_REGISTERING).register_all(db, list(found.todo), options, report, progress, helpers)
