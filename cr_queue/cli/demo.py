"""crh demo: the whole pipeline on synthetic tomodirs, in one command."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

from cr_queue import add, config, local
from cr_queue.db import connection as db
from cr_queue.solvers import solvers
from cr_queue.tomodir import synth
from cr_queue.cli.common import Output, handle_errors, output_options, setup_logging


def _standin(name: str) -> str:
    script = f"crh_standin_{name}"
    found = shutil.which(script) or str(Path(sys.executable).parent / script)
    return found


@click.command("demo")
@click.option("--db", "db_url", default=None, metavar="URL", help="Run on this database instead of the embedded one.")
@click.option("--keep", is_flag=True, help="Keep the demo directory for a look afterwards.")
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Jobs the local worker runs at once.")
@output_options
@handle_errors
def demo_command(db_url, keep, jobs, as_json, quiet, log_level):
    """Generate a few synthetic tomodirs, add them, run a local worker, retrieve, and report."""
    setup_logging(log_level)
    out = Output(json=as_json, quiet=quiet)
    settings = config.load(db=db_url)
    # The demo keeps to the embedded database unless told otherwise, so it never
    # puts toy jobs into a group's shared queue.
    database = db.open_database(config.Settings(
        database_url=db_url,
        database_source="option" if db_url else "embedded",
        crtomo=settings.crtomo,
        crmod=settings.crmod,
        config_path=settings.config_path,
        raw=settings.raw,
    ))
    try:
        solver_map = solvers.resolve({"crtomo": (settings.crtomo, "config"), "crmod": (settings.crmod, "config")})
        used_standin = False
    except solvers.SolverError:
        solver_map = solvers.resolve({"crtomo": (_standin("crtomo"), "stand-in"), "crmod": (_standin("crmod"), "stand-in")})
        used_standin = True
    if set(solver_map) != {"crmod", "crtomo"}:
        missing = {"crmod", "crtomo"} - set(solver_map)
        for name in missing:
            solver_map[name] = solvers.resolve({name: (_standin(name), "stand-in")})[name]
        used_standin = True
    root = Path(tempfile.mkdtemp(prefix="crh-demo-"))
    tomodirs = synth.make_tree(root, n_mod=2, n_inv=2, n_both=2)
    out.line(f"demo tree with {len(tomodirs)} synthetic tomodirs in {root}")
    out.line(f"database: {database.redacted} ({database.source})")
    if used_standin:
        out.line("solvers: the cr_queue STAND-IN (no real CRMod/CRTomo configured); results are not physics", fg="yellow")
    else:
        out.line("solvers: " + ", ".join(f"{solvers.DISPLAY[n]} {s.path}" for n, s in sorted(solver_map.items())))
    result = local.run_local(
        database,
        [root],
        add.AddOptions(),
        solver_map,
        limits=config.archive_limits(settings),
        jobs=jobs,
        on_added=lambda item: out.line(f"added job {item.job_id} ({'+'.join(item.steps)}): {item.path.relative_to(root)}"),
        on_event=lambda message: out.line(f"  worker: {message}"),
    )
    report = result.retrieved
    finished = len(report.retrieved)
    ok = finished == len(tomodirs) and not report.failed and not report.problems
    out.emit(
        {
            "root": str(root),
            "tomodirs": len(tomodirs),
            "finished": finished,
            "failed": len(report.failed),
            "problems": report.problems,
            "standin": used_standin,
            "ok": ok,
        }
    )
    for item in report.retrieved:
        out.line(f"  finished and retrieved: {item.path.relative_to(root)} ({item.files} result files)")
    for item in report.failed:
        out.line(f"  FAILED: {item.path.relative_to(root)}: {item.reason}", fg="red")
    for problem in report.problems:
        out.warn(problem)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    out.line(
        f"demo {'OK' if ok else 'FAILED'}: {finished} of {len(tomodirs)} tomodirs finished and retrieved"
        + ("" if keep else " (demo directory removed; --keep keeps it)"),
        fg="green" if ok else "red",
    )
    raise SystemExit(0 if ok else 1)
