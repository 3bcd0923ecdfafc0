"""The invariants a fault run ends with, from the database and the files.

Each broken invariant is one :class:`Finding` in one of three classes, the
numbers of the summary line: ``lost`` (a tomodir whose job never ended or
was never brought back), ``duplicated`` (a tomodir registered twice, an
attempt completed twice, a solver step run more often than its claims
explain) and ``wrong`` (everything else: a wrong state or failure category,
a result not byte-identical to what its solver wrote, a changed input,
something left in the tree or the scratch, a story the events do not tell,
a worker that ended by itself or exited 0 after an internal error).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..faults import standin_alive
from .world import World

JOB_DIR = re.compile(r"/crh-w(\d+)-job(\d+)-")
ADD_TMP = re.compile(r"\..+\.crh\.[0-9a-f]+\.tmp")
# The status an event may lead to from the status before it.
NEXT = {
    None: {"registering"},
    "registering": {"registering", "queued"},
    "queued": {"queued", "running", "cancelled"},
    "running": {"running", "finished", "failed", "queued", "cancelled"},
    "finished": {"finished"},
    "failed": {"failed"},
    "cancelled": {"cancelled"},
}
TERMINAL_EVENTS = ("finished", "failed")


@dataclass
class Finding:
    kind: str  # lost | duplicated | wrong, or known: a known defect's mark whose switch is off (not counted)
    what: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.what}"


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check(world: World) -> list[Finding]:
    found: list[Finding] = []
    found += _jobs(world)
    retrieved = {row[0] for row in world.sql("SELECT source_path FROM inversions WHERE downloaded")}
    found += _files(world, retrieved)
    found += _workers(world)
    return found


def _jobs(world: World) -> list[Finding]:
    found = []
    rows = world.sql(
        "SELECT id, source_path, status, failure_category, attempt, downloaded, failure_reason FROM inversions"
    )
    events = defaultdict(list)
    for job_id, event, status, attempt in world.sql("SELECT job_id, event, status, attempt FROM events ORDER BY id"):
        events[job_id].append((event, status, attempt))
    by_path = defaultdict(list)
    for row in rows:
        by_path[row[1]].append(row)
    known = {str(td.path) for td in world.tomodirs}
    for path in set(by_path) - known:
        found.append(Finding("wrong", f"a job for {path}, which the run never made"))
    claims = {job_id: sum(1 for e in evs if e[0] == "claimed") for job_id, evs in events.items()}
    for td in world.tomodirs:
        jobs = by_path.get(str(td.path), [])
        if not jobs:
            found.append(Finding("lost", f"{td.tag}: never registered"))
            continue
        if len(jobs) > 1:
            found.append(Finding("duplicated", f"{td.tag}: registered {len(jobs)} times (jobs {sorted(j[0] for j in jobs)})"))
        for job_id, _path, status, category, attempt, downloaded, reason in jobs:
            want = td.behaviour
            if status not in ("finished", "failed", "cancelled"):
                found.append(Finding("lost", f"{td.tag}: job {job_id} still {status}"))
                continue
            if (status, category) != (want.status, want.category):
                found.append(Finding(
                    "wrong",
                    f"{td.tag}: job {job_id} ended {status}/{category} ({reason}), "
                    f"its behaviour calls for {want.status}/{want.category}",
                ))
            if not downloaded:
                found.append(Finding("lost", f"{td.tag}: job {job_id} ended {status} but was never retrieved"))
            evs = events.get(job_id, [])
            terminal = [e for e in evs if e[0] in TERMINAL_EVENTS]
            if len(terminal) > 1:
                found.append(Finding("duplicated", f"{td.tag}: job {job_id} completed {len(terminal)} times: {terminal}"))
            story = _story(evs, status, attempt)
            if story:
                found.append(Finding("wrong", f"{td.tag}: the events of job {job_id} do not tell its story: {story}"))
    runs = Counter()
    for _pid, solver, cwd in world.runs():
        m = JOB_DIR.search(cwd)
        if m:
            runs[(int(m.group(2)), solver)] += 1
    for (job_id, solver), n in runs.items():
        if n > claims.get(job_id, 0):
            found.append(Finding("duplicated", f"job {job_id}: {solver} ran {n} times for {claims.get(job_id, 0)} claims"))
    return found


def _story(evs: list[tuple[str, str, int]], status: str, attempt: int) -> str | None:
    previous = None
    for event, event_status, _attempt in evs:
        if event_status not in NEXT.get(previous, set()):
            return f"{event!r} leads from {previous} to {event_status} ({[e[0] for e in evs]})"
        if event == "claimed" and previous != "queued":
            return f"claimed while {previous} ({[e[0] for e in evs]})"
        previous = event_status
    if previous != status:
        return f"the last event leaves it {previous}, the job is {status}"
    terminal = [e for e in evs if e[0] in TERMINAL_EVENTS]
    if status in TERMINAL_EVENTS and (not terminal or terminal[-1][2] != attempt):
        return f"no {status} event for its final attempt {attempt} ({terminal})"
    return None


def _files(world: World, retrieved: set[str]) -> list[Finding]:
    """Inputs unchanged; results (of the jobs brought back: the others are lost already) as written; nothing left."""
    found = []
    records = defaultdict(list)
    for entry in world.written():
        records[(entry["tag"], entry["solver"])].append(entry)
    for td in world.tomodirs:
        for rel, digest in td.inputs.items():
            if _sha(td.path / rel) != digest:
                found.append(Finding("wrong", f"{td.tag}: input {rel} is not what the user had"))
        if str(td.path) not in retrieved:
            continue
        if td.behaviour.status == "finished":
            solvers = ("crmod",) if td.behaviour.kind == "mod" else ("crtomo",) if td.behaviour.kind == "inv" else ("crmod", "crtomo")
            for solver in solvers:
                ok = [e for e in records.get((td.tag, solver), []) if e["outcome"] == "ok"]
                if not ok:
                    found.append(Finding("wrong", f"{td.tag}: no run of {solver} recorded a result, yet it should be finished"))
                    continue
                if any(e["files"] != ok[0]["files"] for e in ok):
                    found.append(Finding("wrong", f"{td.tag}: runs of {solver} wrote different bytes"))
                for rel, digest in ok[0]["files"].items():
                    if rel.endswith(".pid"):
                        continue
                    if _sha(td.path / rel) != digest:
                        found.append(Finding("wrong", f"{td.tag}: retrieved {rel} is not byte-identical to what {solver} wrote"))
        elif td.behaviour.category == "error_dat":
            wrote = {e["files"].get("exe/error.dat") for s in ("crmod", "crtomo") for e in records.get((td.tag, s), [])}
            if _sha(td.path / "exe" / "error.dat") not in wrote:
                found.append(Finding("wrong", f"{td.tag}: retrieved exe/error.dat is not one a solver wrote"))
    for path in sorted(world.tree.rglob("*")):
        rel = path.relative_to(world.tree).as_posix()
        if path.name.startswith(".") or path.suffix in (".crh", ".tmp") or ".crh-" in path.name:
            if ADD_TMP.fullmatch(path.name) and "add_tmp_left" not in world.plan.switches:
                found.append(Finding("known", f"left in the user's tree by a killed crh_add (defect 10): {rel}"))
            else:
                found.append(Finding("wrong", f"left in the user's tree: {rel}"))
    for w in world.workers:
        if w.workdir.exists():
            left = [p.name for p in w.workdir.iterdir() if p.name.startswith("crh-")]
            if left:
                found.append(Finding("wrong", f"left in the scratch of {w.name} ({w.workdir}): {sorted(set(left))}"))
    alive = sorted({pid for pid, _s, _c in world.runs() if standin_alive(pid)})
    if alive:
        found.append(Finding("wrong", f"stand-in solvers still running after every worker ended: {alive}"))
    return found


def _workers(world: World) -> list[Finding]:
    found = []
    for w in world.workers:
        code = w.proc.returncode
        log = w.log()
        internal = "Traceback" in log
        if code == 0 and internal:
            found.append(Finding("wrong", f"{w.name} exited 0 after an internal error:\n{_traceback(log)}"))
        if w.ended_by == "kill9":
            continue
        if w.ended_by is None and code == 2 and _refused_at_start(log):
            continue  # started while the database was down: refused at once, as documented (exit 2)
        if w.ended_by is None and not w.quit_when_empty:
            found.append(Finding("wrong", f"{w.name} ended by itself (exit {code}) during the run: {_tail(log)}"))
        elif code != 0 and w.ended_by != "kill9":
            found.append(Finding("wrong", f"{w.name} exited {code} ({w.ended_by or 'quit when empty'}): {_tail(log)}"))
    return found


def _refused_at_start(log: str) -> bool:
    """The command could not reach the database before the worker started (its schema
    check): refused at once, as documented; once the check has passed, the worker
    rides out any outage, its start included."""
    return ") started:" not in log and (
        "cannot connect to the database" in log
        or "lost the connection to the database" in log
        # Started while its TCP path was frozen: the connect timeout (docs/admin.md).
        or "did not answer within" in log
    )


def _tail(log: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in log.strip().splitlines()[-lines:])


def _traceback(log: str) -> str:
    start = log.find("Traceback")
    return log[start : start + 1500]
