"""Where crh_retrieve puts each result file, with and without the atomic exchange.

The result is unpacked straight into a hard-link copy of the tomodir (or,
where directories cannot be exchanged, moved in file by file); both ways
must give the same tree: inputs untouched, results in place, and a file
the user changed (or a symlink) kept, with the result beside it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cr_queue import add, retrieve
from cr_queue.queries import jobs, workers
from cr_queue import store
from cr_queue.tomodir import archive, swap
from cr_queue.tomodir import synth
from cr_queue.db.connection import Database


def _tree_state(root: Path) -> dict[str, str]:
    state = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            state[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    return state


def _finish_with(conn, result: Path) -> int:
    """Claim the one queued job and complete it with the tree ``result`` as its result."""
    wid = workers.register_worker(conn, name="t", host="h", pid=os.getpid(), version="t", jobs=1, threads=1, groups=(), solvers={})
    actor = jobs.Actor(worker_id=wid)
    job = jobs.claim(conn, actor=actor, can_mod=True, can_inv=True, lease_s=60)
    sha = store.put_tree(conn, store.DATABASE, result).sha256
    assert jobs.complete(conn, job, result_sha256=sha, exit_code=0, actor=actor)
    return job.id


def _scenario(tmp_path: Path, db_url: str) -> tuple[Database, Path, Path]:
    """A registered tomodir, then the user's changes, and a finished job whose result touches each case."""
    db = Database(url=db_url, source="test", embedded=False, store=store.DATABASE)
    td = synth.make_tree(tmp_path / "tree", n_inv=1)[0]
    report = add.add(db, [td], add.AddOptions())
    assert len(report.added) == 1, report.problems
    (td / "inv" / "mine.txt").write_text("changed by the user after crh_add\n")
    os.symlink("../exe/crtomo.cfg", td / "inv" / "linked.dat")
    (td / "inv" / "same.dat").write_text("identical\n")

    result = tmp_path / "result"
    (result / "inv" / "sub").mkdir(parents=True)
    (result / "exe").mkdir()
    (result / "inv" / "inv.ctr").write_text("***finished***\n")
    (result / "inv" / "sub" / "deep.dat").write_text("deep\n")
    (result / "inv" / "mine.txt").write_text("the solver's version\n")
    (result / "inv" / "linked.dat").write_text("not through the link\n")
    (result / "inv" / "same.dat").write_text("identical\n")
    (result / "exe" / "crh_solver.log").write_text("log\n")
    os.symlink("inv.ctr", result / "inv" / "last.ctr")
    (result / "grid").mkdir()
    (result / "grid" / "elem.dat").write_text("an input file the solver rewrote\n")
    with db.connect("test") as conn:
        _finish_with(conn, result)
    return db, td, result


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "file-by-file"])
def test_results_land_beside_what_the_user_changed(tmp_path, db_url, monkeypatch, exchange):
    db, td, _ = _scenario(tmp_path, db_url)
    if not exchange:
        def unsupported(a, b):
            raise swap.SwapUnsupported("test: no renameat2 here")

        monkeypatch.setattr(swap, "exchange", unsupported)
    before = _tree_state(td)
    report = retrieve.retrieve(db, [td.parent], limits=archive.Limits())
    assert not report.problems and [i.path for i in report.retrieved] == [td]
    [item] = report.retrieved
    assert sorted(item.conflicts) == ["inv/linked.dat", "inv/mine.txt"]

    after = _tree_state(td)
    assert (td / "inv" / "mine.txt").read_text() == "changed by the user after crh_add\n"
    assert (td / "inv" / "mine.txt.crh-result").read_text() == "the solver's version\n"
    assert os.readlink(td / "inv" / "linked.dat") == "../exe/crtomo.cfg"
    assert (td / "inv" / "linked.dat.crh-result").read_text() == "not through the link\n"
    assert not (td / "inv" / "same.dat.crh-result").exists()
    assert (td / "inv" / "sub" / "deep.dat").read_text() == "deep\n"
    assert os.readlink(td / "inv" / "last.ctr") == "inv.ctr"
    assert (td / "grid" / "elem.dat").read_text() == "an input file the solver rewrote\n"
    assert (td / "exe" / "crh_solver.log").read_text() == "log\n"
    untouched = {k: v for k, v in before.items() if k not in ("grid/elem.dat",)}
    assert {k: after[k] for k in untouched} == untouched, "every other input is as it was"
    assert not td.with_suffix(".crh").exists()
    assert not [p.name for p in td.parent.iterdir() if p.name.startswith(".")], "nothing left beside the tomodir"
    assert not list(td.glob(".crh-retrieved-*"))
    with db.connect("test") as conn:
        assert conn.execute("SELECT downloaded FROM inversions").fetchall() == [(True,)]


def test_retrieval_keeps_directory_modes_and_files_made_meanwhile(tmp_path, db_url, monkeypatch):
    db, td, _ = _scenario(tmp_path, db_url)
    os.chmod(td / "config", 0o750)
    mtime = 1_600_000_000_000_000_000
    os.utime(td / "rho", ns=(mtime, mtime))
    made_meanwhile = td / "notes.txt"
    real_exchange = swap.exchange

    def exchange_after_the_user_wrote(a, b):
        made_meanwhile.write_text("written while the copy was built\n")
        real_exchange(a, b)

    monkeypatch.setattr(swap, "exchange", exchange_after_the_user_wrote)
    report = retrieve.retrieve(db, [td.parent], limits=archive.Limits())
    assert not report.problems and len(report.retrieved) == 1
    assert made_meanwhile.read_text() == "written while the copy was built\n"
    assert (td / "config").stat().st_mode & 0o777 == 0o750
    assert (td / "rho").stat().st_mtime_ns == mtime
