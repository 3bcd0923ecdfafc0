"""The download spool: memory kept per thread, a file past the limit."""

from __future__ import annotations

import threading
from pathlib import Path

from cr_queue.util.spool import Spool


def test_bytes_come_back_from_memory(tmp_path: Path) -> None:
    with Spool(1 << 20, tmp_path, "x") as spool:
        for piece in (b"abc", memoryview(b"defg"), b""):
            spool.write(piece)
        source = spool.source()
        assert isinstance(source, memoryview)
        assert bytes(source) == b"abcdefg" and len(spool) == 7
    assert list(tmp_path.iterdir()) == []


def test_the_next_spool_on_a_thread_reuses_the_memory_and_sees_only_its_bytes(tmp_path: Path) -> None:
    with Spool(1 << 20, tmp_path, "x") as first:
        first.write(b"1" * 5000)
        memory = first.source().obj
    with Spool(1 << 20, tmp_path, "x") as second:
        second.write(b"22")
        assert second.source().obj is memory
        assert bytes(second.source()) == b"22"


def test_spools_open_at_once_do_not_share_memory(tmp_path: Path) -> None:
    with Spool(1 << 20, tmp_path, "x") as warm:
        warm.write(b"w" * 100)
    with Spool(1 << 20, tmp_path, "x") as outer, Spool(1 << 20, tmp_path, "x") as inner:
        outer.write(b"outer")
        inner.write(b"inner!")
        assert (bytes(outer.source()), bytes(inner.source())) == (b"outer", b"inner!")


def test_threads_have_their_own_memory(tmp_path: Path) -> None:
    seen: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def download(n: int) -> None:
        with Spool(1 << 20, tmp_path, "x") as spool:
            spool.write(bytes([n]) * 1000)
            barrier.wait()
            assert bytes(spool.source()) == bytes([n]) * 1000
            seen[n] = spool.source().obj

    threads = [threading.Thread(target=download, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[1] is not seen[2]


def test_growing_keeps_earlier_views_valid(tmp_path: Path) -> None:
    with Spool(1 << 20, tmp_path, "x") as spool:
        spool.write(b"a" * 10)
        early = spool.source()
        spool.write(b"b" * 100_000)  # a larger buffer; the early view still reads the old one
        assert bytes(early) == b"a" * 10
        assert bytes(spool.source()) == b"a" * 10 + b"b" * 100_000


def test_past_the_limit_the_download_goes_on_in_an_unnamed_file(tmp_path: Path) -> None:
    with Spool(1000, tmp_path, "x") as spool:
        spool.write(b"m" * 600)
        spool.write(b"f" * 600)
        spool.write(b"g" * 10)
        source = spool.source()
        assert not isinstance(source, memoryview)
        assert source.read() == b"m" * 600 + b"f" * 600 + b"g" * 10
        assert spool.source().read(3) == b"mmm"  # from the start again
        assert len(spool) == 1210
        assert list(tmp_path.iterdir()) == []
    with Spool(1000, tmp_path, "x") as after:
        after.write(b"small")
        assert bytes(after.source()) == b"small"
