"""solvers.run_step waits for a solver through a pidfd, and as Popen does where there is none."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cr_queue.solvers import solvers


def _solver(tmp_path: Path, body: str) -> tuple[solvers.Solver, Path]:
    tomodir = tmp_path / "td"
    (tomodir / "exe").mkdir(parents=True)
    script = tmp_path / "crtomo"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return solvers.Solver("crtomo", script), tomodir


@pytest.fixture(params=["pidfd", "polling"])
def waiting(request, monkeypatch) -> str:
    if request.param == "polling":
        monkeypatch.delattr(os, "pidfd_open")
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    return request.param


def test_exit_status_and_output_of_a_short_solver(tmp_path: Path, waiting: str) -> None:
    solver, tomodir = _solver(tmp_path, "echo ran in $(basename $PWD)\nexit 3\n")
    with open(tmp_path / "log", "wb") as log:
        outcome = solvers.run_step(solver, tomodir, step="inv", threads=1, log=log)
    assert (outcome.returncode, outcome.timed_out, outcome.aborted) == (3, False, False)
    assert (tmp_path / "log").read_bytes().endswith(b"ran in exe\n")


class _ClockJumpingAt:
    """``time`` for run_step whose clock jumps an hour ahead once ``path`` exists.

    The timeout then passes right after the solver's child is known, however
    slowly a loaded machine starts it, and never before."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def monotonic(self) -> float:
        return time.monotonic() + (3600.0 if self.path.exists() else 0.0)


def test_timeout_kills_the_solver_and_its_children(tmp_path: Path, waiting: str, monkeypatch) -> None:
    pids = tmp_path / "pids"
    solver, tomodir = _solver(tmp_path, f"sleep 60 & echo $! > {pids}.tmp && mv {pids}.tmp {pids}\nwait\n")
    monkeypatch.setattr(solvers, "time", _ClockJumpingAt(pids))
    with open(tmp_path / "log", "wb") as log:
        outcome = solvers.run_step(solver, tomodir, step="inv", threads=1, log=log, timeout=1800)
    assert outcome.timed_out and not outcome.aborted
    # SIGKILLed with its group: soon gone, or a zombie until whoever inherited it reaps it.
    stat = Path(f"/proc/{int(pids.read_text())}/stat")
    for _ in range(100):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.05)
    assert state in ("gone", "Z")


def test_abort_stops_a_running_solver(tmp_path: Path, waiting: str) -> None:
    solver, tomodir = _solver(tmp_path, "sleep 60\n")
    abort = threading.Event()
    threading.Timer(0.2, abort.set).start()
    with open(tmp_path / "log", "wb") as log:
        outcome = solvers.run_step(solver, tomodir, step="inv", threads=1, log=log, abort=abort)
    assert outcome.aborted and not outcome.timed_out and outcome.returncode is not None
