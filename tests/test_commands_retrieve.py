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
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


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
