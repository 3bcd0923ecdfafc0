"""A second process for crh_retrieve, so that its Python work runs on two cores.

crh_retrieve's threads spend most of their time in system calls and zstd,
which release the GIL, but parsing tar headers, the placement rules and the
bookkeeping around every file hold it: on two cores the threads of one
process waited on each other.  With enough tomodirs to bring back, a console
script's crh_retrieve therefore forks one helper after it has read the
``.crh`` files and asked the database about their jobs, and before it has a
connection open or a thread started.

Both processes take tomodirs from one pipe (forks.WorkPipe), each exactly
once, bring them back with their own threads and connections, and record
them (flag them downloaded, drop marker and ``.crh``) themselves.  The
helper tells the parent, through a pipe, which tomodir it took and then how
it ended; the parent reports everything, in the same way as its own.

The helper dies with the parent.  If it dies first, the tomodirs it had
taken and not reported are reported as not brought back; what it left
beside them is what an interrupted crh_retrieve leaves, and the next run
finishes it.  The tomodirs it had not taken yet are left in the pipe for the
parent's threads.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Protocol

import psycopg

from cr_queue.util import forks
from cr_queue import config
from cr_queue.db.connection import Database, DatabaseError
from cr_queue.util.pause import pause_point

# The kinds of frames (forks.FRAME) the helper sends.
_TAKEN, _ITEM, _PROBLEM = 1, 2, 3
# The least number of tomodirs worth a second process (a fork and its connections cost a few tomodirs' time).
MIN_TOMODIRS = 16
# The one pause point (CRH_PAUSE_AT, see pause.py) that keeps the helper: it stops
# there having taken a tomodir, for the test that kills it then.
PAUSE_TOOK = "retrieve:helper-took"
# The helper's sessions in pg_stat_activity (the parent's are "crh_retrieve").
HELPER_APPLICATION = "crh_retrieve helper"


class Sink(Protocol):
    """Where a process's recorded tomodirs and problems go."""

    def item(self, index: int, item) -> None: ...

    def problem(self, index: int, text: str) -> None: ...


def default_processes() -> int:
    """Processes for a crh_retrieve command, itself included: two where there are two
    CPUs or more (measured on two; more processes would be a guess), else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def wanted(tomodirs: int, processes: int) -> bool:
    """Whether to fork: allowed, worth it, and safe (no thread of this process may be running)."""
    pause = os.environ.get("CRH_PAUSE_AT")
    return (
        processes > 1
        and tomodirs >= MIN_TOMODIRS
        and (not pause or pause == PAUSE_TOOK)
        and threading.active_count() == 1
    )


def share(db: Database, work: list, sink: Sink, runner: Callable, *, threads: int) -> bool:
    """Bring back ``work`` in this process and a forked helper; report all of it to
    ``sink``.  False, having done nothing, when the system refuses the fork.

    ``runner`` is retrieve._Runner: ``runner(db, conn, work, take, threads, sink,
    foreign=..., sources=..., application_name=...)`` with ``run()`` and ``post(event)``."""
    indices = forks.WorkPipe(range(len(work)))
    r_fd, w_fd = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:  # out of processes or memory: this process does it alone
        for fd in (r_fd, w_fd):
            os.close(fd)
        indices.close()
        return False
    if pid == 0:  # the helper: never returns
        os.close(r_fd)
        _helper(parent, db, work, indices, w_fd, runner, threads)
    os.close(w_fd)
    indices.after_fork(child=False)
    helper = _Helper(pid, r_fd, work, sink)
    try:
        conn = db.connect("crh_retrieve")
        try:
            run = runner(db, conn, work, indices.take, threads, sink, foreign=helper.handle, sources=1)
            helper.start_reading(run.post)
            run.run()
        finally:
            conn.close()
    finally:
        helper.close()
        indices.close()
    return True


class _Helper(forks.Child):
    """The parent's side: reads the helper's frames on a thread and hands them to the settling thread."""

    def __init__(self, pid: int, r_fd: int, work: list, sink: Sink) -> None:
        super().__init__(pid)
        self._reader = os.fdopen(r_fd, "rb")
        self._work = work
        self._sink = sink
        self._taken: set[int] = set()
        self._thread: threading.Thread | None = None

    def start_reading(self, post: Callable[[tuple], None]) -> None:
        self._thread = threading.Thread(target=self._read, args=(post,), name="crh_retrieve-helper", daemon=True)
        self._thread.start()

    def _read(self, post: Callable[[tuple], None]) -> None:
        try:
            while (frame := forks.read_frame(self._reader)) is not None:
                post(("helper", *frame))
        except forks.BrokenFrame:
            pass  # the helper died mid-frame: _ended reports what it had taken
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the command is ending
        finally:
            post(("helper-ended",))
            post(("end",))

    def handle(self, event: tuple) -> None:
        """On the settling thread: one frame of the helper's, or its end."""
        if event[0] == "helper-ended":
            self._ended()
            return
        _, kind, index, payload = event
        if kind == _TAKEN:
            self._taken.add(index)
        elif kind == _ITEM:
            self._taken.discard(index)
            self._sink.item(index, pickle.loads(payload))
        elif kind == _PROBLEM:
            self._taken.discard(index)
            self._sink.problem(index, payload.decode("utf-8", "replace"))

    def _ended(self) -> None:
        status = self.wait()
        for index in sorted(self._taken):
            w = self._work[index]
            self._sink.problem(
                index,
                f"{w.crh}: job {w.job.id} was not brought back: crh_retrieve's helper process ended "
                f"early ({forks.describe(status)}). Run crh_retrieve again: it finishes what was left.",
            )
        self._taken.clear()

    def close(self) -> None:
        """Stop the helper if it still runs (the parent is failing), reap it, close the pipe."""
        self.kill()
        self.wait()
        self._reader.close()
        if self._thread is not None:
            self._thread.join()


class _Frames:
    """The helper's side of the pipe (frames are written whole, from any thread)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, kind: int, index: int, payload: bytes = b"") -> None:
        with self._lock:
            forks.write_frame(self._fd, kind, index, payload)

    def item(self, index: int, item) -> None:
        self.send(_ITEM, index, pickle.dumps(item))

    def problem(self, index: int, text: str) -> None:
        self.send(_PROBLEM, index, text.encode("utf-8", "surrogateescape"))


def _helper(parent: int, db: Database, work: list, indices: forks.WorkPipe, w_fd: int, runner: Callable, threads: int) -> None:
    code = 1
    try:
        forks.die_with(parent)
        # Ctrl-C reaches the whole process group: the parent decides (and kills us).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        indices.after_fork(child=True)
        frames = _Frames(w_fd)

        def take() -> int | None:
            index = indices.take()
            if index is not None:
                frames.send(_TAKEN, index)
                pause_point(PAUSE_TOOK)
            return index

        # Named apart from the parent's, so that an admin (and a test) can tell the two sessions apart.
        conn = db.connect(HELPER_APPLICATION)
        try:
            runner(db, conn, work, take, threads, frames, application_name=HELPER_APPLICATION).run()
        finally:
            conn.close()
        code = 0
    except DatabaseError as exc:
        sys.stderr.write(f"crh_retrieve's helper process: {exc}\n")
    except psycopg.OperationalError as exc:
        # The database went away under it (stopped, restarted, a cut network): an
        # everyday fault, said in one line; the parent reports the tomodirs it leaves.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(
            f"crh_retrieve's helper process: lost the connection to the database ({config.redact(detail)}); "
            "the tomodirs it was bringing back are left as they were: run crh_retrieve again once the database is back.\n"
        )
    except BaseException:  # noqa: BLE001 - the parent reports what was left; this says why
        traceback.print_exc()
    finally:
        os._exit(code)
