"""What the commands that fork helper processes share (crh_add's packers,
crh_retrieve's second process): a work list the parent's threads and the
helpers take from, each item exactly once; the frames a helper sends its
parent through a pipe; and helpers that die with their parent."""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import os
import signal
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import BinaryIO

_INDEX = struct.Struct("=I")
PR_SET_PDEATHSIG = 1
F_SETPIPE_SZ = 1031


class WorkPipe:
    """The indices of the work still to do, shared by the parent's threads and every helper.

    Every index is 4 bytes in one pipe: a pipe read of 4 bytes takes one whole
    index, and each is read once, so every item is done exactly once, by
    whoever is free first."""

    def __init__(self, indices: Sequence[int]) -> None:
        self._r, w = os.pipe()
        data = b"".join(_INDEX.pack(i) for i in indices)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, max(len(data), 4096))
        except OSError:
            pass  # larger than this system allows: the feeder thread writes the rest
        os.set_blocking(w, False)
        sent = 0
        try:
            while sent < len(data):
                sent += os.write(w, data[sent:])
        except BlockingIOError:
            pass
        self._rest = data[sent:]
        self._w: int | None = w
        if not self._rest:
            os.close(w)
            self._w = None

    def after_fork(self, child: bool) -> None:
        """In a helper: drop the write end.  In the parent: feed what did not fit, then close it."""
        if self._w is None:
            return
        if child:
            os.close(self._w)
            self._w = None
            return
        threading.Thread(target=self._feed, name="crh-work-pipe", daemon=True).start()

    def _feed(self) -> None:
        w, self._w = self._w, None
        os.set_blocking(w, True)
        view = memoryview(self._rest)
        try:
            while view:
                view = view[os.write(w, view) :]
        except OSError:
            pass  # everybody stopped reading: the command is ending
        finally:
            os.close(w)

    def take(self) -> int | None:
        """The next index, or None when every one has been taken."""
        try:
            raw = os.read(self._r, _INDEX.size)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return None
            raise
        if not raw:
            return None
        if len(raw) != _INDEX.size:
            raise RuntimeError(f"the work pipe gave a {len(raw)}-byte index")
        return _INDEX.unpack(raw)[0]

    def close(self) -> None:
        if self._r >= 0:
            os.close(self._r)
            self._r = -1


class Indices:
    """A work list for the threads of one process (the same interface as :class:`WorkPipe`)."""

    def __init__(self, indices: Iterable[int]) -> None:
        self._left = collections.deque(indices)

    def take(self) -> int | None:
        try:
            return self._left.popleft()
        except IndexError:
            return None


FRAME = struct.Struct("=BIQ")
"""A helper's message to its parent: kind, work index, payload length; then the payload."""


class BrokenFrame(EOFError):
    """The pipe ended inside a frame: the helper writing it died."""


def write_frame(fd: int, kind: int, index: int, payload: bytes = b"") -> None:
    """Write one frame whole (a caller sharing ``fd`` between threads holds a lock around it)."""
    views = [memoryview(FRAME.pack(kind, index, len(payload))), memoryview(payload)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def read_frame(pipe: BinaryIO) -> tuple[int, int, bytes] | None:
    """The next ``(kind, index, payload)``; None where the pipe ends between frames."""
    header = pipe.read(FRAME.size)
    if not header:
        return None
    if len(header) != FRAME.size:
        raise BrokenFrame(f"the pipe ended inside a frame's header ({len(header)} of {FRAME.size} bytes)")
    kind, index, size = FRAME.unpack(header)
    payload = pipe.read(size) if size else b""
    if len(payload) != size:
        raise BrokenFrame(f"the pipe ended inside a frame ({len(payload)} of {size} bytes)")
    return kind, index, payload


class Child:
    """A forked helper seen from its parent: its exit status, waited for once from
    whichever thread asks first, and SIGKILL while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._status: int | None = None
        self._reaping = threading.Lock()

    def wait(self) -> int:
        with self._reaping:
            if self._status is None:
                _pid, self._status = os.waitpid(self.pid, 0)
        return self._status

    def kill(self) -> None:
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def die_with(parent: int) -> None:
    """SIGKILL when the parent dies; if it died already, go now."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def describe(status: int) -> str:
    """A helper's wait status in words."""
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
