"""crh_retrieve under real trouble: a full disk (issue 14, defect 6), a second crh_retrieve at once (defect 5).

The full disk is a small tmpfs mounted for the test (root only) and filled
to the last block; the tree on it is compared byte for byte before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from cr_queue.tomodir import synth

from .conftest import run, script
from .faults import small_tmpfs


def _tree_state(top: Path) -> dict[str, tuple[str, str]]:
    """Every entry below ``top`` (hidden ones too): its kind and, for a file, its content hash."""
    state = {}
    for p in sorted(top.rglob("*")):
        rel = p.relative_to(top).as_posix()
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            state[rel] = ("dir", "")
        else:
            state[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return state


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 16 MB tmpfs of this test's own, unmounted at the end."""
    with small_tmpfs(tmp_path / "small", "16m") as mount:
        yield mount


def _fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to its last byte; returns the filler file."""
    filler = directory / "filler"
    block = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    f.write(block[:size])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def test_retrieve_on_a_full_disk_reports_the_tomodir_leaves_it_as_it_was_and_goes_on(lab, small_fs):
    small_tree = small_fs / "tree"
    full_td = synth.make_tomodir(small_tree / "td_full", "mod", seed=7)
    (full_td / "exe" / "standin.cfg").write_text("sleep = 0\n")
    [fine_td] = lab.tomodirs(1, cfg="sleep = 0")
    ids = lab.add(small_tree, lab.tree)
    assert len(ids) == 2
    code, report = lab.worker("w", "-q").finish()
    assert code == 0 and report["finished"] == 2

    filler = _fill(small_fs)
    before = _tree_state(small_fs)
    done = run([script("crh_retrieve"), "--json", str(small_tree), str(lab.tree)], lab.env, check=1)
    assert "Traceback" not in done.stderr, done.stderr
    out = json.loads(done.stdout)
    assert [Path(i["path"]) for i in out["retrieved"]] == [fine_td]
    [problem] = out["problems"]
    assert str(full_td) in problem and "no space left" in problem
    assert f"on {small_fs} (tmpfs)" in problem, problem
    assert "needs about" in problem and "free" in problem and "run crh_retrieve again" in problem
    assert _tree_state(small_fs) == before, "the tomodir and its parent are exactly as they were"

    filler.unlink()
    again = json.loads(run([script("crh_retrieve"), "--json", str(small_tree)], lab.env).stdout)
    assert [Path(i["path"]) for i in again["retrieved"]] == [full_td] and not again["problems"]
    assert (full_td / "mod" / "volt.dat").exists() or any((full_td / "mod").iterdir())


def _retrieved_everything(lab, tds, ids) -> None:
    from cr_queue.tomodir import discover

    for td in tds:
        assert discover.classify(td) == discover.Done(td)
        assert not td.with_suffix(".crh").exists()
        assert not list(td.glob(".crh-retrieved-*")), "no retrieval marker left"
        assert not [p for p in td.parent.iterdir() if p.name.startswith(f".{td.name}.crh")], "nothing left beside it"
    assert lab.sql("SELECT count(*) FROM inversions WHERE downloaded AND id = ANY(%s)", (ids,)) == [(len(ids),)]


def test_a_second_crh_retrieve_leaves_a_tomodir_to_the_one_bringing_it_back(lab):
    tds = lab.tomodirs(2, cfg="sleep = 0")
    ids = lab.add()
    code, report = lab.worker("w", "-q").finish()
    assert code == 0 and report["finished"] == 2
    first = lab.run_until_paused([script("crh_retrieve"), "--json", str(lab.tree)], "retrieve:downloaded")

    second = run([script("crh_retrieve"), str(lab.tree)], lab.env)
    assert "Traceback" not in second.stderr
    assert f"another crh_retrieve (pid {first.pid} on " in second.stdout
    for td in tds:
        assert f"is bringing back the tomodirs in {lab.tree}: {td} is left to it" in second.stdout, second.stdout
    assert "2 left to another crh_retrieve" in second.stdout

    first.kill()
    first.wait()
    out = json.loads(run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(i["job_id"] for i in out["retrieved"]) == sorted(ids) and not out["problems"]
    _retrieved_everything(lab, tds, ids)


def test_two_crh_retrieve_at_once_complete_every_tomodir_without_a_traceback(lab):
    tds = lab.tomodirs(40, cfg="sleep = 0")
    ids = lab.add()
    code, report = lab.worker("w", "-q", "--jobs", "4").finish()
    assert code == 0 and report["finished"] == 40
    procs = [lab.spawn([script("crh_retrieve"), "--json", str(lab.tree)]) for _ in range(2)]
    retrieved = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        out = json.loads(stdout)
        assert proc.returncode == 0 and not out["problems"], (out["problems"], stderr)
        retrieved += [i["job_id"] for i in out["retrieved"]]
    assert sorted(retrieved) == sorted(ids), "each tomodir was brought back by exactly one of the two"
    _retrieved_everything(lab, tds, ids)
