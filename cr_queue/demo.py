"""The demo: the whole pipeline on synthetic tomodirs, in one command (crh demo).

It decides two things a first-time user should not have to: the database
(the embedded one unless a URL is given, so toy jobs never land in a group's
shared queue) and the solvers (the configured ones where there are, else
cr_queue's stand-in, and it says so).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cr_queue import add, config, local
from cr_queue.database import open_database
from cr_queue.db.connection import Database
from cr_queue.solvers import solvers
from cr_queue.tomodir import synth


@dataclass
class Demo:
    """A demo set up and ready to run: its tree, database and solvers."""

    root: Path
    tomodirs: list[Path]
    database: Database
    solver_map: dict[str, solvers.Solver]
    standin: bool  # the stand-in solver runs for at least one of them
    settings: config.Settings = field(repr=False)


@dataclass
class DemoResult:
    tomodirs: int
    run: local.LocalRun

    @property
    def finished(self) -> int:
        """Tomodirs finished and retrieved."""
        return len(self.run.retrieved.retrieved)

    @property
    def ok(self) -> bool:
        report = self.run.retrieved
        return self.finished == self.tomodirs and not report.failed and not report.problems


def prepare(db_url: str | None) -> Demo:
    """Synthetic tomodirs in a new temporary directory, the database and the solvers to run them."""
    settings = config.load(db=db_url)
    # The demo keeps to the embedded database unless told otherwise, so it never
    # puts toy jobs into a group's shared queue.
    database = open_database(
        config.Settings(
            database_url=db_url,
            database_source="option" if db_url else "embedded",
            crtomo=settings.crtomo,
            crmod=settings.crmod,
            config_path=settings.config_path,
            raw=settings.raw,
            connect_timeout=settings.connect_timeout,
        )
    )
    solver_map, standin = _solvers(settings)
    root = Path(tempfile.mkdtemp(prefix="crh-demo-"))
    tomodirs = synth.make_tree(root, n_mod=2, n_inv=2, n_both=2)
    return Demo(root, tomodirs, database, solver_map, standin, settings)


def run(
    demo: Demo,
    *,
    jobs: int,
    keep: bool,
    on_added: Callable[[add.Added], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> DemoResult:
    """Add the demo's tomodirs, run them on a local worker, retrieve them; remove the tree unless ``keep``."""
    try:
        result = local.run_local(
            demo.database,
            [demo.root],
            add.AddOptions(),
            demo.solver_map,
            limits=config.archive_limits(demo.settings),
            jobs=jobs,
            on_added=on_added,
            on_event=on_event,
        )
    finally:
        if not keep:
            shutil.rmtree(demo.root, ignore_errors=True)
    return DemoResult(len(demo.tomodirs), result)


def _solvers(settings: config.Settings) -> tuple[dict[str, solvers.Solver], bool]:
    """The configured solvers, with the stand-in for any that is missing; whether the stand-in is used."""
    try:
        found = solvers.resolve({"crtomo": (settings.crtomo, "config"), "crmod": (settings.crmod, "config")})
    except solvers.SolverError:
        found = {}
    missing = {"crmod", "crtomo"} - set(found)
    for name in sorted(missing):
        found[name] = solvers.resolve({name: (_standin(name), "stand-in")})[name]
    return found, bool(missing)


def _standin(name: str) -> str:
    script = f"crh_standin_{name}"
    return shutil.which(script) or str(Path(sys.executable).parent / script)


def left_behind(demo) -> list[str]:
    """What the demo leaves on this machine once it is done, to say so: its jobs stay in
    the database, and an embedded server it started keeps running."""
    lines = [
        f"the demo's {len(demo.tomodirs)} jobs stay in the database {demo.database.redacted} "
        "(crh status and crh show list them)"
    ]
    if demo.database.embedded:
        lines.append("the embedded PostgreSQL keeps running for the next command; `crh db stop` stops it")
    return lines
