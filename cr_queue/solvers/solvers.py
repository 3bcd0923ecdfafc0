"""Finding, running and judging CRMod and CRTomo.

The real solvers exit 0 when they fail, so the exit status alone says little:
a step succeeded only when it exited 0, left no ``exe/error.dat`` and the
tomodir no longer needs that step by the same rules that made it a job.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cr_queue.solvers import reaper
from cr_queue.tomodir import discover

STEP_SOLVER = {"mod": "crmod", "inv": "crtomo"}
DISPLAY = {"crmod": "CRMod", "crtomo": "CRTomo"}
# Names the binaries usually have, tried on PATH when nothing is configured.
PATH_NAMES = {"crmod": ("CRMod", "CRMod_dev"), "crtomo": ("CRTomo", "CRTomo_dev")}
# Files a previous run may have left in the user's copy; they would confuse the verdict.
STALE_FILES = ("exe/error.dat", "exe/crtomo.pid", "exe/crmod.pid")
PR_SET_PDEATHSIG = 1
SETPRIV = shutil.which("setpriv")
NICE = shutil.which("nice")
# Environment the worker may hold that says where the database is and how to log in.
SECRET_ENV = ("CRH_DATABASE_URL", "PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGSSLKEY")


class SolverError(Exception):
    """A solver binary is missing or unusable: the worker must not start."""


@dataclass(frozen=True)
class Solver:
    name: str
    path: Path

    def describe(self) -> dict[str, object]:
        """Provenance of the binary: what exactly computed a result."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return {"path": str(self.path), "sha256": digest.hexdigest(), "size": self.path.stat().st_size}


def _check(name: str, raw: str, origin: str) -> Solver:
    path = Path(raw).expanduser()
    if not path.is_absolute() and os.sep not in raw:
        found = shutil.which(raw)
        if found:
            path = Path(found)
    if not path.exists():
        raise SolverError(
            f"the {DISPLAY[name]} binary {path} (from {origin}) does not exist. "
            f"Give the right path with --{name}, CRH_{name.upper()} or [solvers] {name} in the config."
        )
    if not path.is_file() or not os.access(path, os.X_OK):
        raise SolverError(
            f"the {DISPLAY[name]} binary {path} (from {origin}) is not an executable file. "
            f"Fix its permissions (chmod +x {path}) or point --{name} at the right file."
        )
    return Solver(name, path.resolve())


def resolve(configured: Mapping[str, tuple[str | None, str]]) -> dict[str, Solver]:
    """Check the configured solvers; fall back to the usual names on PATH.

    ``configured`` maps "crmod"/"crtomo" to (path or None, where it came from).
    A configured path that is wrong is an error even if the other solver is fine:
    a typo must not silently turn a node into one that only models.
    """
    solvers: dict[str, Solver] = {}
    for name in ("crmod", "crtomo"):
        raw, origin = configured.get(name, (None, ""))
        if raw:
            solvers[name] = _check(name, raw, origin)
            continue
        for candidate in PATH_NAMES[name]:
            found = shutil.which(candidate)
            if found:
                solvers[name] = _check(name, found, "PATH")
                break
    if not solvers:
        raise SolverError(
            "no solver found: neither CRMod nor CRTomo is configured or on PATH. "
            "Give them with --crmod/--crtomo, CRH_CRMOD/CRH_CRTOMO or [solvers] in the config "
            "(for a trial without the real binaries: --crmod crh_standin_crmod --crtomo crh_standin_crtomo)."
        )
    return solvers


def prepare(tomodir: Path) -> None:
    """Remove leftovers of an earlier run from the worker's private copy."""
    for rel in STALE_FILES:
        (tomodir / rel).unlink(missing_ok=True)


@dataclass(frozen=True)
class Outcome:
    step: str
    returncode: int | None
    timed_out: bool
    aborted: bool
    elapsed: float


@dataclass(frozen=True)
class Verdict:
    ok: bool
    category: str | None = None
    reason: str | None = None
    exit_code: int | None = None


def run_step(
    solver: Solver,
    tomodir: Path,
    *,
    step: str,
    threads: int,
    log: BinaryIO,
    timeout: float | None = None,
    abort: threading.Event | None = None,
    nice: int = 0,
    env: Mapping[str, str] | None = None,
) -> Outcome:
    """Run one solver in ``tomodir/exe`` in its own process group.

    The whole group is killed on timeout or abort, and when the step ends
    every descendant left (even one in a session of its own) is killed
    (reaper.py), so helpers the solver spawned do not outlive the job.
    """
    run_env = dict(os.environ if env is None else env)
    # The solver reads an untrusted tomodir and needs no database: keep credentials away from it.
    for name in SECRET_ENV:
        run_env.pop(name, None)
    run_env["OMP_NUM_THREADS"] = str(threads)
    token = run_env[reaper.TOKEN_ENV] = reaper.new_token()
    log.write(f"=== cr_queue: {DISPLAY[solver.name]} {solver.path} with OMP_NUM_THREADS={threads}\n".encode())
    log.flush()
    start = time.monotonic()
    if not os.access(solver.path, os.X_OK):
        # Checked here because setpriv would report it only as the solver's exit status.
        raise PermissionError(errno.EACCES, "not an executable file (any more)", str(solver.path))
    argv, preexec = _launch(solver, nice)
    with reaper.launching() as running:
        proc = subprocess.Popen(
            argv,
            cwd=tomodir / "exe",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_env,
            start_new_session=True,
            preexec_fn=preexec,
        )
        running.add(proc.pid)
    timed_out = aborted = False
    try:
        with _ExitWatch(proc) as ended:
            while not ended(0.05 if time.monotonic() - start < 1 else 0.25):
                if timeout is not None and time.monotonic() - start > timeout:
                    timed_out = True
                elif abort is not None and abort.is_set():
                    aborted = True
                else:
                    continue
                kill_group(proc)
                break
    finally:
        if proc.returncode is None:
            kill_group(proc)
        reaper.forget(proc.pid)
        reaper.end_step(proc.pid, token)
    return Outcome(step, proc.returncode, timed_out, aborted, time.monotonic() - start)


class _ExitWatch:
    """``ended(seconds)``: whether the process has ended (and is reaped), waiting at most that long.

    Through a pidfd it wakes the moment the solver exits.  Popen.wait(timeout)
    polls instead, sleeping 1, 2, 4 ... ms between looks: a solver that exited
    after 3.5 ms was noticed at 7 ms, and for short jobs that was a fifth of the
    worker's overhead per job (bench/run's overhead row)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # Linux before 5.3, or not Linux: poll as Popen does
            pass

    def __enter__(self) -> Callable[[float], bool]:
        return self._ended

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def _ended(self, seconds: float) -> bool:
        if self._fd is not None:
            if not select.select([self._fd], [], [], seconds)[0]:
                return False
            self._proc.wait()
            return True
        try:
            self._proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False


def _launch(solver: Solver, nice: int) -> tuple[list[str], Callable[[], None] | None]:
    """The command line that starts a solver so that it dies with its worker.

    util-linux's setpriv sets PR_SET_PDEATHSIG and then execs the solver
    (``nice`` in between when asked), which lets Python start it without a
    full fork; a Python preexec_fn would force one and cost ~12 ms per job.
    """
    argv = [str(solver.path)]
    if nice:
        argv = [NICE, "-n", str(nice), *argv] if NICE else argv
    if SETPRIV:
        return [SETPRIV, "--pdeathsig", "KILL", "--", *argv], None
    return [str(solver.path)], _child_setup(nice)


def _child_setup(nice: int) -> Callable[[], None]:
    """In the child: die with the worker (kill -9 of the worker must not leave an orphan
    solver writing into a deleted directory), and lower the priority if asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        prctl = None

    def setup() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if nice:
            os.nice(nice)

    return setup


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _error_dat_text(path: Path) -> str:
    text = path.read_text(errors="replace")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return " | ".join(lines)[:2000]


def judge(outcome: Outcome, tomodir: Path, timeout: float | None = None) -> Verdict:
    solver = DISPLAY[STEP_SOLVER[outcome.step]]
    rc = outcome.returncode
    if outcome.timed_out:
        return Verdict(False, "timeout", f"{solver} ran longer than the job's timeout of {timeout:g} s; its process group was killed", rc)
    if outcome.aborted:
        return Verdict(False, "aborted", f"{solver} was stopped by the worker", rc)
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return Verdict(False, "signal", f"{solver} was killed by {name}", rc)
    if rc:
        return Verdict(False, "exit_code", f"{solver} exited with status {rc}", rc)
    error_dat = tomodir / "exe" / "error.dat"
    if error_dat.exists():
        return Verdict(False, "error_dat", f"{solver} wrote exe/error.dat: {_error_dat_text(error_dat)}", rc)
    state = discover.classify(tomodir)
    still = isinstance(state, discover.Tomodir) and (
        state.needs_mod if outcome.step == "mod" else state.needs_inv
    )
    if still or isinstance(state, discover.Incomplete):
        missing = "mod/volt.dat" if outcome.step == "mod" else "inv/inv.ctr ending in ***finished***"
        return Verdict(False, "output_missing", f"{solver} exited 0 without writing {missing}", rc)
    return Verdict(True, exit_code=rc)
