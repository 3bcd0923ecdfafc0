"""packers: crh_add's helper processes pack tomodirs and stream them back (pure, no database)."""

from __future__ import annotations

import hashlib
import io
import fcntl
import os
import signal
import struct
import termios
from pathlib import Path

import pytest

from cr_queue import packers
from cr_queue.tomodir import archive
from cr_queue.tomodir import discover
from cr_queue.util import forks
from cr_queue.tomodir import synth

from .faults import wait_for

F_GETPIPE_SZ = 1032  # linux/fcntl.h


def _pipe_half_full(fd: int) -> bool:
    """More in the pipe than any frame but an archive's data can be (a pipe fills by pages, never quite whole)."""
    waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return waiting >= fcntl.fcntl(fd, F_GETPIPE_SZ) // 2


def _tomodirs(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = root / f"td_{i:02d}"
        synth.make_tomodir(path, "mod", nx=6, nz=3, seed=i)
        paths.append(path)
    return paths


def _packed(path: Path) -> archive.PackResult:
    return archive.pack(path, io.BytesIO())


def test_every_tomodir_is_packed_once_by_a_helper_or_the_parent(tmp_path):
    roots = _tomodirs(tmp_path, 12)
    group = packers.Packers(roots, list(range(12)), helpers=2)
    try:
        by_parent = []
        while (index := group.work.take()) is not None:
            by_parent.append(index)
            if len(by_parent) == 2:
                break  # leave the rest to the helpers
        by_helpers = {}
        for helper in group.helpers:
            for delivery in helper.deliveries():
                assert delivery.read(1 << 30)
                out = io.BytesIO()
                result = delivery.write_to(out)
                assert hashlib.sha256(out.getvalue()).hexdigest() == result.sha256
                assert result.sha256 == _packed(roots[delivery.index]).sha256, "the same bytes as packing here"
                assert result.manifest == _packed(roots[delivery.index]).manifest
                by_helpers[delivery.index] = helper.pid
            assert helper.lost() is None and helper.wait() == 0
        assert sorted(by_parent + list(by_helpers)) == list(range(12)), "each tomodir exactly once"
        assert set(by_helpers.values()) <= {h.pid for h in group.helpers} and os.getpid() not in by_helpers.values()
    finally:
        group.close()


def test_a_large_archive_streams_and_a_failed_one_reports_its_own_error(tmp_path):
    roots = _tomodirs(tmp_path, 3)
    (roots[1] / "big.dat").write_bytes(os.urandom(3 << 20))  # incompressible: larger than the limit below
    roots.append(tmp_path / "vanished")  # packing it fails
    group = packers.Packers(roots, [3, 0, 1, 2], helpers=1)
    outcomes = {}
    try:
        for delivery in group.helpers[0].deliveries():
            try:
                whole = delivery.read(1 << 20)
            except NotADirectoryError as exc:
                outcomes[delivery.index] = exc
                continue
            out = io.BytesIO()
            result = delivery.write_to(out)
            outcomes[delivery.index] = (whole, hashlib.sha256(out.getvalue()).hexdigest() == result.sha256)
        assert group.helpers[0].lost() is None
    finally:
        group.close()
    assert isinstance(outcomes[3], NotADirectoryError) and "vanished" in str(outcomes[3])
    assert outcomes[0] == (True, True) and outcomes[2] == (True, True)
    assert outcomes[1] == (False, True), "the large one was streamed, not held"


def test_a_killed_helper_fails_exactly_what_it_had_taken(tmp_path):
    roots = _tomodirs(tmp_path, 6)
    (roots[0] / "big.dat").write_bytes(os.urandom(1 << 20))
    # Nothing buffered (budget 0) and nobody reading: the helper takes the first
    # tomodir, and its megabyte fills the pipe, so it waits holding it.
    group = packers.Packers(roots, list(range(6)), helpers=1, budget=0)
    helper = group.helpers[0]
    try:
        # Synchronised on the pipe, not a sleep: once it holds archive data, the
        # helper has reported taking tomodir 0 and is sending it; its megabyte
        # cannot pass the unread pipe, so it takes nothing else.
        wait_for(lambda: _pipe_half_full(helper._up.fileno()), "the helper to send tomodir 0 into its pipe", 120)
        os.kill(helper.pid, signal.SIGKILL)
        with pytest.raises(packers.HelperDied, match=f"signal {signal.SIGKILL}"):
            for delivery in helper.deliveries():
                delivery.read(1 << 30)
        left = []
        while (index := group.work.take()) is not None:
            left.append(index)
    finally:
        group.close()
    assert helper.outstanding == [0], "the one it had taken"
    assert left == [1, 2, 3, 4, 5], "the rest is still there for the parent"


def test_indices_beyond_what_a_pipe_holds_come_out_once_each_in_order():
    pipe = forks.WorkPipe(range(300_000))
    pipe.after_fork(child=False)
    try:
        got = []
        while (index := pipe.take()) is not None:
            got.append(index)
    finally:
        pipe.close()
    assert got == list(range(300_000))


def test_start_forks_only_when_there_is_enough_new_work(tmp_path):
    roots = _tomodirs(tmp_path, 8)
    todo = discover.discover([tmp_path]).todo
    assert [td.path for td in todo] == roots
    assert packers.start(todo, force=False, processes=1) is None, "one process: no helpers"
    assert packers.start(todo[:7], force=False, processes=4) is None, "fewer than eight new tomodirs: no helpers"
    for path in roots[:1]:
        path.with_suffix(".crh").write_text("{}")
    assert packers.unregistered(todo, force=False) == list(range(1, 8))
    assert packers.unregistered(todo, force=True) == list(range(8))
    group = packers.start(todo, force=True, processes=4)
    try:
        assert group is not None and len(group.helpers) == 1 and group.indices == list(range(8))
    finally:
        group.close()
