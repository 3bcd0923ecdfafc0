"""Helper processes that pack crh_add's tomodirs from its first milliseconds on.

A crh_add command spends its first 0.1-0.2 s importing the database driver
and connecting, on one core.  Packing (tar + zstd + sha256) needs neither,
so crh_add forks its helpers *before* those imports (add.run): each packs
tomodirs on a core of its own while the parent is still starting, streams
every archive back through a pipe, and the parent stores them (the parent's
own threads pack and store the rest meanwhile).  The helpers import nothing
more than packing needs and never touch the database.

Who packs which tomodir is decided as the work goes: the helpers and the
parent's threads take the indices of the tomodirs from one pipe
(:class:`forks.WorkPipe`), so every tomodir is packed exactly once, by
whoever is free first.

A helper announces each index it takes, then sends the archive in pieces and
finally its :class:`archive.PackResult` (or the exception that stopped it).
It buffers up to ``budget`` bytes while the parent is not yet reading, dies
with the parent (``PR_SET_PDEATHSIG``), and never runs the parent's exit
handlers.  If a helper dies, exactly the tomodirs it had taken and not
delivered fail with :class:`HelperDied`.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from cr_queue.tomodir import archive
from cr_queue.tomodir import control
from cr_queue.util import forks

# The kinds of frames (forks.FRAME) a helper sends.
_TAKEN, _DATA, _DONE, _FAILED = 1, 2, 3, 4
# What a helper holds while the parent is not reading (it is still starting up:
# about 30 one-megabyte tomodirs get packed meanwhile, 4 MB), and what the
# parent holds of archives read whole but not yet stored.
BUDGET = 32 << 20
PIECE = 1 << 20


class HelperDied(RuntimeError):
    """A helper process ended before it delivered a tomodir it had taken."""


# The least work worth a process of its own.
MIN_TOMODIRS_PER_PROCESS = 4


def default_processes() -> int:
    """Processes for a crh_add command, itself included: a helper per CPU besides the
    parent (whose threads mostly store what the helpers deliver), four in all at most;
    none on one CPU.  Measured on two CPUs (docs/performance.md): two helpers beat one
    by 7-10 % and three lost again."""
    cpus = os.cpu_count() or 1
    return 1 if cpus < 2 else min(cpus + 1, 4)


def start(todo: Sequence, *, force: bool, processes: int) -> Packers | None:
    """Fork the helpers that pack ``todo``'s new tomodirs, if there is enough work for
    them, or return None.  Only a process with no threads yet may call this (a
    console script's own: add.run calls it before importing the database driver)."""
    if processes < 2 or len(todo) < 2 or os.environ.get("CRH_PAUSE_AT"):
        return None
    fresh = unregistered(todo, force)
    helpers = max(1, min(processes, len(fresh) // MIN_TOMODIRS_PER_PROCESS)) - 1
    if not helpers:
        return None
    return Packers([td.path.resolve() for td in todo], fresh, helpers)


def unregistered(todo: Sequence, force: bool) -> list[int]:
    """Indices of the tomodirs in ``todo`` that get a new job: those without a
    ``.crh`` (all of them with ``force``).  The others need the database before
    anything else (resume or skip), so only the parent handles them."""
    return [i for i, td in enumerate(todo) if force or not control.control_path(td.path.resolve()).exists()]


class Delivery:
    """One tomodir's archive as a helper sends it.

    :meth:`read` takes a small archive whole (it can then be stored by any
    thread, see :class:`Inbox`); :meth:`write_to` streams (the rest of) it into
    a store's writer."""

    def __init__(self, helper: Helper, index: int) -> None:
        self.index = index
        self._helper = helper
        self._pieces: list[bytes] = []
        self._size = 0
        self.result: archive.PackResult | None = None
        self.finished = False

    @property
    def size(self) -> int:
        """Bytes read so far."""
        return self._size

    def read(self, limit: int) -> bool:
        """Read the archive into memory unless it is larger than ``limit`` bytes;
        whether it was (then :meth:`write_to` needs nothing more from the pipe)."""
        return self._take(None, limit)

    def write_to(self, out: archive.Writable) -> archive.PackResult:
        """Copy the archive into ``out``; return its PackResult, or raise what stopped the helper packing it."""
        for piece in self._pieces:
            out.write(piece)
        self._pieces = []
        if not self.finished:
            self._take(out, None)
        assert self.result is not None
        return self.result

    def _take(self, out: archive.Writable | None, limit: int | None) -> bool:
        try:
            while limit is None or self._size <= limit:
                kind, index, payload = self._helper._frame()
                if index != self.index:
                    raise RuntimeError(f"a helper of crh_add sent tomodir {index} inside tomodir {self.index}")
                if kind == _DATA:
                    if out is None:
                        self._pieces.append(payload)
                    else:
                        out.write(payload)
                    self._size += len(payload)
                elif kind == _DONE:
                    result: archive.PackResult = pickle.loads(payload)
                    if result.size != self._size:
                        raise RuntimeError(f"a helper of crh_add sent {self._size} bytes of a {result.size}-byte archive")
                    self.result = result
                    self.finished = True
                    return True
                elif kind == _FAILED:
                    raise pickle.loads(payload)
                else:
                    raise RuntimeError(f"a helper of crh_add sent an unknown frame ({kind})")
            return False
        except BaseException:
            self.finished = True
            raise

    def packed(self) -> tuple[list[bytes], archive.PackResult]:
        """After :meth:`read` returned True: the archive's pieces and its PackResult."""
        assert self.finished and self.result is not None
        return self._pieces, self.result

    def skip(self) -> None:
        """Read past the rest of this archive (its tomodir failed before storing it)."""
        if not self.finished:
            try:
                self._take(_Discard(), None)
            except Exception:  # noqa: BLE001 - the helper's own error for a tomodir we gave up on
                pass


class Inbox:
    """Archives read whole from the helpers, waiting for any of the parent's threads
    to store them; at most ``budget`` bytes (a receiver waits beyond that)."""

    def __init__(self, senders: int, budget: int = BUDGET) -> None:
        self._items: collections.deque[Delivery] = collections.deque()
        self._bytes = 0
        self._budget = budget
        self._senders = senders
        self._closed = False
        self._cond = threading.Condition()

    def put(self, delivery: Delivery) -> None:
        with self._cond:
            while self._bytes > self._budget and not self._closed:
                self._cond.wait()
            self._items.append(delivery)
            self._bytes += delivery.size
            self._cond.notify_all()

    def done(self, deliveries: list[Delivery]) -> None:
        """``deliveries`` have been stored: their bytes no longer count."""
        with self._cond:
            self._bytes -= sum(delivery.size for delivery in deliveries)
            self._cond.notify_all()

    def sender_finished(self) -> None:
        with self._cond:
            self._senders -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Wake everybody: the command is ending."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, limit: int, wait: bool) -> list[Delivery]:
        """Up to ``limit`` archives, oldest first; none if there are none (``wait``: none will come any more)."""
        with self._cond:
            while wait and not self._items and self._senders > 0 and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            return [self._items.popleft() for _ in range(min(limit, len(self._items)))]


class _Discard:
    def write(self, data) -> int:
        return len(data)


class Helper(forks.Child):
    """The parent's side of one helper process."""

    def __init__(self, pid: int, up: int) -> None:
        super().__init__(pid)
        self._up = os.fdopen(up, "rb", buffering=PIECE)
        self._pushback: tuple[int, int, bytes] | None = None
        # Indices the helper took and has not delivered yet.
        self.outstanding: list[int] = []

    def deliveries(self) -> Iterator[Delivery]:
        """Every archive the helper sends, in order; each is read by the caller (or
        skipped here) before the next.  Ends when the helper does; if it died, the
        tomodirs it had not delivered are left in :attr:`outstanding` (see :meth:`lost`)."""
        while True:
            frame = self._pushback if self._pushback is not None else self._next()
            if frame is None:
                break
            self._pushback = frame
            delivery = Delivery(self, frame[1])
            yield delivery
            delivery.skip()
            self.outstanding.remove(delivery.index)
        self.wait()

    def lost(self) -> HelperDied | None:
        """After :meth:`deliveries`: the error for the tomodirs in :attr:`outstanding`, if any."""
        return self._died() if self.outstanding else None

    def _frame(self) -> tuple[int, int, bytes]:
        frame, self._pushback = self._pushback, None
        if frame is None:
            frame = self._next()
        if frame is None:
            raise self._died()
        return frame

    def _next(self) -> tuple[int, int, bytes] | None:
        """The next frame but TAKEN ones (which only record what the helper took); None at the end."""
        while True:
            try:
                frame = forks.read_frame(self._up)
            except forks.BrokenFrame:
                raise self._died() from None
            if frame is None or frame[0] != _TAKEN:
                return frame
            self.outstanding.append(frame[1])

    def _died(self) -> HelperDied:
        return HelperDied(f"a helper process of this command ended early ({forks.describe(self.wait())})")

    def close(self) -> None:
        self._up.close()


class Packers:
    """The work pipe and the helper processes of one crh_add; see the module docstring."""

    def __init__(self, roots: Sequence[Path], indices: Sequence[int], helpers: int, *, budget: int = BUDGET) -> None:
        self.indices = list(indices)
        self.work = forks.WorkPipe(self.indices)
        self.helpers: list[Helper] = []
        parent = os.getpid()
        paths = {i: roots[i] for i in self.indices}
        for _ in range(helpers):
            up_r, up_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the helper: never returns
                os.close(up_r)
                for earlier in self.helpers:
                    earlier._up.close()
                _run_helper(parent, paths, self.work, up_w, budget)
            os.close(up_w)
            self.helpers.append(Helper(pid, up_r))
        self.work.after_fork(child=False)

    def kill(self) -> None:
        for helper in self.helpers:
            helper.kill()

    def close(self) -> None:
        """Stop (if still running) and reap the helpers; close the pipes."""
        self.kill()
        for helper in self.helpers:
            helper.wait()
            helper.close()
        self.work.close()


# ------------------------------------------------------------------ the helper


class _Outbox:
    """Frames waiting for the pipe, at most ``budget`` bytes: the packer blocks beyond it."""

    def __init__(self, fd: int, budget: int) -> None:
        self._fd = fd
        self._budget = budget
        self._frames: collections.deque[tuple[int, int, bytes] | None] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._send, name="crh_add-send", daemon=True)
        self._thread.start()

    def put(self, kind: int, index: int, payload: bytes = b"") -> None:
        with self._cond:
            while self._bytes > self._budget and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            self._frames.append((kind, index, payload))
            self._bytes += len(payload)
            self._cond.notify_all()

    def _send(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._frames:
                        self._cond.wait()
                    frame = self._frames.popleft()
                if frame is None:
                    return
                forks.write_frame(self._fd, *frame)
                with self._cond:
                    self._bytes -= len(frame[2])
                    self._cond.notify_all()
        except BaseException as exc:  # the parent went away: stop packing
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._frames.append(None)
            self._cond.notify_all()
        self._thread.join()


class _Pieces:
    """The archive as DATA frames of PIECE bytes."""

    def __init__(self, outbox: _Outbox, index: int) -> None:
        self._outbox = outbox
        self._index = index
        self._buf = bytearray()

    def write(self, data) -> int:
        self._buf += data
        if len(self._buf) >= PIECE:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._outbox.put(_DATA, self._index, bytes(self._buf))
            self._buf.clear()


def _run_helper(parent: int, paths: dict[int, Path], work: forks.WorkPipe, up_w: int, budget: int) -> None:
    code = 1
    try:
        forks.die_with(parent)
        # Ctrl-C reaches the whole process group: the parent decides (and kills us).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        work.after_fork(child=True)
        outbox = _Outbox(up_w, budget)
        while (index := work.take()) is not None:
            outbox.put(_TAKEN, index)
            pieces = _Pieces(outbox, index)
            try:
                result = archive.pack(paths[index], pieces)
            except Exception as exc:  # noqa: BLE001 - the parent reports it for this tomodir
                outbox.put(_FAILED, index, _pickled(exc))
                continue
            pieces.flush()
            outbox.put(_DONE, index, pickle.dumps(result))
        outbox.close()
        code = 0 if outbox.error is None else 1
    finally:
        os._exit(code)


def _pickled(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:  # an exception that does not pickle: its type and message do
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))

