"""The Python API end to end against a real database and a real worker process."""

from __future__ import annotations

import pytest

from cr_queue.tomodir import discover
from cr_queue.tomodir import synth
from cr_queue.api import JobError, Queue

from .conftest import run, script


def _files(tomodir):
    return {p.relative_to(tomodir).as_posix(): p.read_bytes() for p in tomodir.rglob("*") if p.is_file()}


def test_submit_wait_fetch_retrieve_cancel(tmp_path, cli_env, db_url):
    tree = tmp_path / "tree"
    on_disk = synth.make_tree(tree, n_inv=2)
    memory_src = synth.make_tomodir(tmp_path / "mem", "both")
    failing_src = synth.make_tomodir(tmp_path / "bad", "mod")
    (failing_src / "exe" / "standin.cfg").write_text("fail = error_dat\n")
    with Queue.open(db_url) as q:
        ids = q.submit(tree)
        assert len(ids) == 2 and all(td.with_suffix(".crh").exists() for td in on_disk)
        mem_id = q.submit_files(_files(memory_src))
        bad_id = q.submit_files(_files(failing_src))
        doomed = q.submit_files(_files(synth.make_tomodir(tmp_path / "doomed", "inv", seed=7)))
        assert q.cancel([doomed]) == [doomed]
        run([script("crh_worker"), "-q", "--jobs", "2"], cli_env)
        states = q.wait(ids + [mem_id, bad_id, doomed], timeout=60)
        assert states == {**{i: "finished" for i in ids}, mem_id: "finished", bad_id: "failed", doomed: "cancelled"}
        out = q.fetch(mem_id, tmp_path / "result")
        assert (out / "mod" / "volt.dat").exists()
        assert (out / "inv" / "inv.ctr").read_text().splitlines()[-1].startswith("***finished***")
        with pytest.raises(JobError, match="error_dat"):
            q.fetch(bad_id, tmp_path / "bad_result")
        assert (tmp_path / "bad_result" / "exe" / "error.dat").exists()
        report = q.retrieve(tree)
        assert len(report.retrieved) == 2
        assert all(discover.classify(td) == discover.Done(td) for td in on_disk)
        assert [j.downloaded for j in q.jobs([mem_id])] == [True]


def test_in_memory_input_is_checked(db_url):
    with Queue.open(db_url) as q:
        with pytest.raises(JobError, match="lacks"):
            q.submit_files({"exe/crtomo.cfg": "x"})
        with pytest.raises(JobError, match="inside the tomodir"):
            q.submit_files({"../escape": "x"})
        with pytest.raises(JobError, match="not in the database"):
            q.status(424242)
