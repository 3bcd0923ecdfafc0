"""crh_add under real trouble (issue 14 defects 4, 9, 10; issue 19 item 4): a second crh_add
on the same tree, kill -9 and Ctrl-C, special files, a user login with --local."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import run, script


def _jobs_per_tomodir(lab) -> dict[str, int]:
    return dict(lab.sql("SELECT source_path, count(*) FROM inversions GROUP BY 1"))


def test_a_second_crh_add_skips_what_a_running_one_registers_and_says_so(lab):
    tds = lab.tomodirs(3, cfg="sleep = 0")
    first = lab.run_until_paused([script("crh_add"), "--json", str(lab.tree)], "add:registered")

    second = run([script("crh_add"), "--json", str(lab.tree)], lab.env)
    out = json.loads(second.stdout)
    assert out["added"] == []
    skipped = {Path(s["path"]): s["reason"] for s in out["skipped"]}
    assert set(skipped) == set(tds)
    for reason in skipped.values():
        assert f"another crh_add (pid {first.pid} on " in reason and "is registering it" in reason, reason
    assert _jobs_per_tomodir(lab) == {str(tds[0]): 1}, "the second run made no job"

    first.kill()
    first.wait()
    third = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(Path(a["path"]) for a in third["added"]) == tds
    assert _jobs_per_tomodir(lab) == {str(td): 1 for td in tds}


def test_two_crh_add_at_once_register_each_tomodir_once(lab):
    tds = lab.tomodirs(30, cfg="sleep = 0")
    procs = [lab.spawn([script("crh_add"), "--json", str(lab.tree)]) for _ in range(2)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        outs.append(json.loads(stdout))
    assert _jobs_per_tomodir(lab) == {str(td): 1 for td in tds}
    added = [Path(a["path"]) for out in outs for a in out["added"]]
    assert sorted(added) == tds, "each tomodir was queued by exactly one of the two"
    for out in outs:
        for s in out["skipped"]:
            assert "another crh_add" in s["reason"] or "already registered" in s["reason"], s
    assert lab.sql("SELECT count(*) FROM inversions WHERE status <> 'queued'") == [(0,)]
