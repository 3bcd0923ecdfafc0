"""crh demo: the whole pipeline on synthetic tomodirs, in one command."""

from __future__ import annotations

import click

from cr_queue import demo as demo_service
from cr_queue.cli.common import reports
from cr_queue.solvers import solvers


@click.command("demo")
@click.option("--db", "db_url", default=None, metavar="URL", help="Run on this database instead of the embedded one.")
@click.option("--keep", is_flag=True, help="Keep the demo directory for a look afterwards.")
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Jobs the local worker runs at once.")
@reports
def demo_command(db_url, keep, jobs, out):
    """Generate a few synthetic tomodirs, add them, run a local worker, retrieve, and report."""
    demo = demo_service.prepare(db_url)
    root = demo.root
    out.line(f"demo tree with {len(demo.tomodirs)} synthetic tomodirs in {root}")
    out.line(f"database: {demo.database.redacted} ({demo.database.source})")
    if demo.standin:
        out.line("solvers: the cr_queue STAND-IN (no real CRMod/CRTomo configured); results are not physics", fg="yellow")
    else:
        out.line("solvers: " + ", ".join(f"{solvers.DISPLAY[n]} {s.path}" for n, s in sorted(demo.solver_map.items())))
    result = demo_service.run(
        demo,
        jobs=jobs,
        keep=keep,
        on_added=lambda item: out.line(f"added job {item.job_id} ({'+'.join(item.steps)}): {item.path.relative_to(root)}"),
        on_event=lambda message: out.line(f"  worker: {message}"),
    )
    report = result.run.retrieved
    out.emit(
        {
            "root": str(root),
            "tomodirs": result.tomodirs,
            "finished": result.finished,
            "failed": len(report.failed),
            "problems": report.problems,
            "standin": demo.standin,
            "ok": result.ok,
        }
    )
    for item in report.retrieved:
        out.line(f"  finished and retrieved: {item.path.relative_to(root)} ({item.files} result files)")
    for item in report.failed:
        out.line(f"  FAILED: {item.path.relative_to(root)}: {item.reason}", fg="red")
    for problem in report.problems:
        out.warn(problem)
    out.line(
        f"demo {'OK' if result.ok else 'FAILED'}: {result.finished} of {result.tomodirs} tomodirs finished and retrieved"
        + ("" if keep else " (demo directory removed; --keep keeps it)"),
        fg="green" if result.ok else "red",
    )
    for line in demo_service.left_behind(demo):
        out.line(line)
    raise SystemExit(0 if result.ok else 1)
