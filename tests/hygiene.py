"""The test session leaves the machine as it found it: what it watches, what it undoes, what it reports.

* Every temporary file goes under one session directory in /tmp
  (``crh-test-session-<pid>-*``): ``tempfile`` and ``TMPDIR`` point there
  before any test runs, so pytest's own tmp_path, ``tempfile.mkdtemp()`` and
  the commands the tests start all write below it; it is removed when the
  session ends.
* Switching to another OS user needs an account and, where the interpreter
  or the checkout sits under /root (0700), the search bit on the directories
  above them: :func:`unprivileged_user` and :func:`traverse_grants` give
  both for one test and take them back after it, so no test's result depends
  on what an earlier one left.
* At the end :func:`finish_session` compares the host with the start: new
  entries in /tmp of the kinds cr_queue and its tests make, the modes of
  /root and of every directory above the interpreter, the checkout and HOME,
  and /etc/passwd and /etc/group.  Modes are put back; every difference is
  reported and fails the run.

Plain functions, no pytest: conftest.py wires them into the session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cr_queue.db.embedded import server_user

SESSION_PREFIX = "crh-test-session-"
REPO = Path(__file__).resolve().parents[1]
TMP = Path("/tmp")
# What cr_queue and its tests put in /tmp: their own dirs, embedded socket dirs
# (crh-<uid>-<digest>), pytest's base, sockets.  Other programs on a shared
# machine make entries of their own there, which are not this session's to judge.
TMP_KINDS = ("crh", "pytest-of-", ".s.PGSQL", "cr_queue")
ACCOUNT_FILES = (Path("/etc/passwd"), Path("/etc/group"))
# The one account tests may create, when the system has no ``nobody``.
TEST_USER = f"crh-t{os.getpid()}"


@dataclass
class HostState:
    session_dir: Path
    tmp_entries: set[str]
    modes: dict[Path, int]
    accounts: dict[Path, list[str]]
    saved_tmpdir: str | None
    saved_env: str | None
    problems: list[str] = field(default_factory=list)


def watched_dirs() -> list[Path]:
    """/root, and every directory above the interpreter, this checkout and HOME: what switching users touches."""
    import cr_queue
    import psycopg

    tops = [Path("/root"), Path(sys.executable).resolve(), Path(sys.executable), REPO,
            Path(cr_queue.__file__).resolve(), Path(psycopg.__file__).resolve(), Path.home()]
    found: dict[Path, None] = {}
    for top in tops:
        for path in (top, *top.parents):
            if path.is_dir():
                found[path] = None
    return sorted(found)


def _modes(paths: list[Path]) -> dict[Path, int]:
    modes = {}
    for path in paths:
        try:
            modes[path] = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
    return modes


def _accounts() -> dict[Path, list[str]]:
    return {path: path.read_text().splitlines() for path in ACCOUNT_FILES if path.exists()}


def start_session() -> HostState:
    """Note the host as found, and send every temporary file of the session to a directory of its own."""
    state = HostState(
        session_dir=Path(),
        tmp_entries=set(os.listdir(TMP)),
        modes=_modes(watched_dirs()),
        accounts=_accounts(),
        saved_tmpdir=tempfile.tempdir,
        saved_env=os.environ.get("TMPDIR"),
    )
    state.session_dir = Path(tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{os.getpid()}-", dir=TMP))
    # Like /tmp itself: the unprivileged users some tests switch to (and the
    # embedded server's user) pass through it and may make temp files of their own.
    os.chmod(state.session_dir, 0o1777)
    tempfile.tempdir = str(state.session_dir)
    os.environ["TMPDIR"] = str(state.session_dir)
    return state


def finish_session(state: HostState) -> list[str]:
    """Remove the session directory, undo mode changes, and say everything that differs from the start."""
    problems = list(state.problems)
    problems += _stop_leftover_processes(state.session_dir)
    shutil.rmtree(state.session_dir, ignore_errors=True)
    tempfile.tempdir = state.saved_tmpdir
    if state.saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = state.saved_env
    for name in sorted(set(os.listdir(TMP)) - state.tmp_entries):
        if name.startswith(TMP_KINDS) and not _another_live_session(name):
            problems.append(f"/tmp/{name} was left behind")
    others = _other_live_sessions()
    for path, mode in _modes(list(state.modes)).items():
        if mode != state.modes[path]:
            if others:
                # Which session changed it cannot be told; the last one to end puts it back.
                problems.append(f"{path} mode {mode:04o}, was {state.modes[path]:04o} (left: test sessions {others} run)")
                continue
            problems.append(f"{path} mode {mode:04o}, was {state.modes[path]:04o} (put back)")
            os.chmod(path, state.modes[path])
    for path, lines in _accounts().items():
        before = state.accounts.get(path, [])
        for line in sorted(set(lines) - set(before)):
            problems.append(f"{path} gained {line.split(':', 1)[0]!r}")
        for line in sorted(set(before) - set(lines)):
            problems.append(f"{path} lost {line.split(':', 1)[0]!r}")
    return problems


def _other_live_sessions() -> list[int]:
    return sorted(int(n[len(SESSION_PREFIX):].split("-", 1)[0]) for n in os.listdir(TMP) if _another_live_session(n))


def _another_live_session(name: str) -> bool:
    """A concurrent test session's own directory (its pid is alive): not ours to judge."""
    if not name.startswith(SESSION_PREFIX):
        return False
    pid = name[len(SESSION_PREFIX):].split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and Path(f"/proc/{pid}").exists()


def _stop_leftover_processes(session_dir: Path) -> list[str]:
    """Processes still working in the session directory (a server a test did not stop): reported and ended."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cwd == session_dir or session_dir in cwd.parents:
            found.append(f"process {proc.name} ({command[:80]}) was still running in {cwd} (killed)")
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
    return found


@contextmanager
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    """``nobody`` where it exists, else a system user made now and deleted afterwards."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        nobody = None
    if nobody is not None:
        yield nobody
        return
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
        check=True, capture_output=True,
    )
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        remove_user(TEST_USER)


def remove_user(name: str) -> None:
    """Delete an account a test made; its servers were stopped by the fixtures torn down before."""
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)  # where userdel left the user's group


@contextmanager
def traverse_grants() -> Iterator[Callable[..., None]]:
    """``grant(user, *paths)`` adds the search bit ``user`` needs above ``paths``; every mode goes back afterwards."""
    before: dict[Path, int] = {}

    def grant(user: pwd.struct_passwd, *paths: Path) -> None:
        account = server_user.ServerUser.from_pwd(user)
        for path in paths:
            ancestors = list(Path(path).absolute().parents)
            for ancestor, mode in _modes(ancestors).items():
                before.setdefault(ancestor, mode)
            server_user.grant_traverse(Path(path), account)

    try:
        yield grant
    finally:
        for path, mode in _modes(list(before)).items():
            if mode != before[path]:
                os.chmod(path, before[path])
