"""Making sure nothing a solver started outlives its step (issue 14, defect 8).

Killing the solver's process group is not enough: a helper that called
``setsid`` (a detached daemon, ``setsid sleep 1000 &``) is in a session and
group of its own.  So:

* the worker is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): a solver's
  orphaned descendants are re-parented to the worker instead of to init, where
  the worker can see them among its own children;
* every solver step carries a token in its environment (``CRH_SOLVER_RUN``),
  which its descendants inherit;
* when the step ends, the worker kills the step's process group, then every
  child of its own that carries the step's token, again until none is left
  (killing one may orphan its own children), and reaps them.

Children of the worker that carry no token it is waiting on and have already
exited (strays that ended by themselves) are reaped too, so none stays a
zombie.  The solvers' own processes are never reaped here: ``launching()``
holds the lock under which a solver is started and registered, so a solver
that exits at once cannot have its exit status taken from its Popen.

What this cannot catch: a descendant that scrubbed its environment, or one
still running when the worker itself is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

TOKEN_ENV = "CRH_SOLVER_RUN"
PR_SET_CHILD_SUBREAPER = 36
ROUNDS = 20

_lock = threading.Lock()
_solvers: set[int] = set()  # pids of solver processes a Popen is waiting on


def become_subreaper() -> bool:
    """Have orphaned descendants of this process re-parented to it; False where Linux says no."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def new_token() -> str:
    return uuid.uuid4().hex


@contextmanager
def launching() -> Iterator[set[int]]:
    """Start a solver inside this block and add its pid to the yielded set."""
    with _lock:
        yield _solvers


def forget(pid: int) -> None:
    """The solver ``pid`` was reaped by its Popen."""
    with _lock:
        _solvers.discard(pid)


def end_step(group: int, token: str) -> int:
    """Kill what is left of a finished solver step; returns how many processes were killed."""
    killed = 0
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(ROUNDS):
        strays = [pid for pid in _children() if _carries(pid, token)]
        if not strays:
            break
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for pid in strays:
            _reap(pid, block=True)
    reap_exited()
    return killed


def reap_exited() -> None:
    """Reap children that already exited and that no Popen waits for (strays of earlier steps)."""
    with _lock:
        for pid in _children():
            if pid not in _solvers and _state(pid) == "Z":
                _reap(pid, block=False)


def _children() -> list[int]:
    me = os.getpid()
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{me}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except OSError:
            continue
    return found


def _carries(pid: int, token: str) -> bool:
    with _lock:
        if pid in _solvers:
            return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{TOKEN_ENV}={token}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _reap(pid: int, *, block: bool) -> None:
    try:
        os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        pass
