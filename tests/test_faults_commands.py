"""kill -9 of crh_add and crh_retrieve at each named step (issue 3).

CRH_PAUSE_AT=<point> stops the command at an exact step; the test kills it
there with SIGKILL, checks that nothing half-made is visible (no claimable
job, a tomodir untouched or fully retrieved), then reruns the command and
checks that it finishes the work without a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cr_queue.tomodir import discover

from .conftest import run, script
from .faults import alive, wait_for


def _state(td: Path) -> dict[str, str]:
    """Every file of a tomodir with its content hash, the retrieval marker aside."""
    return {
        p.relative_to(td).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(td.rglob("*"))
        if p.is_file() and not p.name.startswith(".crh-retrieved-")
    }


@pytest.mark.parametrize("point", ["add:registered", "add:uploaded", "add:control_written"])
def test_kill9_of_crh_add_leaves_nothing_claimable_and_a_rerun_completes_it(lab, point):
    first, second = lab.tomodirs(2, cfg="sleep = 0")
    add = lab.run_until_paused([script("crh_add"), "--json", str(lab.tree)], point)
    add.kill()
    add.wait()

    assert lab.sql("SELECT status, source_path FROM inversions") == [("registering", str(first))]
    assert first.with_suffix(".crh").exists() == (point == "add:control_written")
    assert not second.with_suffix(".crh").exists()
    # A real worker finds nothing it could claim.
    code, report = lab.worker("early", "-q").finish()
    assert code == 0 and report["finished"] == report["failed"] == 0
    [(interrupted_id,)] = lab.sql("SELECT id FROM inversions")

    out = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    added = {Path(a["path"]): a for a in out["added"]}
    assert set(added) == {first, second} and not out["problems"]
    assert added[first]["job_id"] == interrupted_id, "the interrupted registration was taken over"
    assert added[first]["resumed"] == (point == "add:control_written")
    rows = lab.sql("SELECT source_path, count(*), min(status), max(status) FROM inversions GROUP BY 1 ORDER BY 1")
    assert rows == [(str(first), 1, "queued", "queued"), (str(second), 1, "queued", "queued")]

    code, report = lab.worker("w", "-q").finish()
    assert code == 0 and report["finished"] == 2
    lab.check_invariants({job_id: "finished" for job_id in (interrupted_id, added[second]["job_id"])})


@pytest.mark.parametrize("point", ["retrieve:downloaded", "retrieve:staged", "retrieve:exchanged"])
def test_kill9_of_crh_retrieve_leaves_the_tomodir_untouched_or_complete(lab, point):
    first, second = lab.tomodirs(2, cfg="sleep = 0")
    ids = lab.add()
    code, report = lab.worker("w", "-q").finish()
    assert code == 0 and report["finished"] == 2
    before = {td: _state(td) for td in (first, second)}

    retrieve = lab.run_until_paused([script("crh_retrieve"), "--json", str(lab.tree)], point)
    retrieve.kill()
    retrieve.wait()
    interrupted = {td: _state(td) for td in (first, second)}

    out = json.loads(run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(i["job_id"] for i in out["retrieved"]) == sorted(ids) and not out["problems"]
    after = {td: _state(td) for td in (first, second)}
    for td in (first, second):
        assert discover.classify(td) == discover.Done(td)
        assert not td.with_suffix(".crh").exists()
        assert after[td] != before[td]
        assert {k: after[td][k] for k in before[td]} == before[td], "the inputs are unchanged"
        assert interrupted[td] in (before[td], after[td]), f"{td.name} was left half retrieved at {point}"
        assert not list(td.glob(".crh-retrieved-*")), "the rerun removes the retrieval marker"
    assert interrupted[second] == before[second], "the second tomodir was not reached"
    leftovers = [p.name for p in lab.tree.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left beside the tomodirs: {leftovers}"
    assert lab.sql("SELECT count(*) FROM inversions WHERE downloaded") == [(2,)]
    lab.check_invariants({job_id: "finished" for job_id in ids})


# Without CRH_PAUSE_AT both commands run with threads and batch their commits
# (registrations, queueing, 'downloaded' flags): a kill -9 halfway through must
# leave the same guarantees as a kill at one of the pause points.


def _commands_on(tree: Path, name: str) -> list[int]:
    """Processes whose command line names ``name`` and ``tree``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(name.encode() in arg for arg in argv) and str(tree).encode() in argv:
                found.append(int(entry.name))
    return found


def _kill_when(proc, ready) -> None:
    wait_for(lambda: ready() or proc.poll() is not None, "the command to get halfway", interval=0.002)
    proc.kill()
    proc.wait()


def test_kill9_of_crh_add_halfway_through_its_threads_then_a_rerun_queues_each_tomodir_once(lab):
    tomodirs = lab.tomodirs(60, cfg="sleep = 0")
    add = lab.spawn([script("crh_add"), "--quiet", str(lab.tree)])
    _kill_when(add, lambda: sum(td.with_suffix(".crh").exists() for td in tomodirs) >= 5)
    # crh_add packs in a forked helper process too: it dies with its parent.
    wait_for(lambda: not [pid for pid in _commands_on(lab.tree, "crh_add") if alive(pid)], "crh_add's helper process to end")

    for job_id, status, source in lab.sql("SELECT id, status, source_path FROM inversions"):
        crh = Path(source).with_suffix(".crh")
        if status == "queued":
            assert crh.exists() and json.loads(crh.read_text())["job_id"] == job_id, "a queued job has its .crh"
        assert status in ("registering", "queued")

    out = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert not out["problems"]
    rows = lab.sql("SELECT source_path, count(*), min(status), max(status) FROM inversions GROUP BY 1 ORDER BY 1")
    assert rows == [(str(td), 1, "queued", "queued") for td in tomodirs], "each tomodir queued exactly once"
    for td in tomodirs:
        [(job_id,)] = lab.sql("SELECT id FROM inversions WHERE source_path = %s", (str(td),))
        assert json.loads(td.with_suffix(".crh").read_text())["job_id"] == job_id

    code, report = lab.worker("w", "-q", "--jobs", "2").finish(timeout=300)
    assert code == 0 and report["finished"] == len(tomodirs)
    lab.check_invariants({job_id: "finished" for (job_id,) in lab.sql("SELECT id FROM inversions")})


def test_kill9_of_crh_retrieve_halfway_through_its_threads_then_a_rerun_completes_every_tomodir(lab):
    tomodirs = lab.tomodirs(40, cfg="sleep = 0")
    ids = lab.add()
    code, report = lab.worker("w", "-q", "--jobs", "2").finish(timeout=300)
    assert code == 0 and report["finished"] == len(tomodirs)
    before = {td: _state(td) for td in tomodirs}

    retrieve = lab.spawn([script("crh_retrieve"), "--quiet", str(lab.tree)])
    _kill_when(retrieve, lambda: sum(not td.with_suffix(".crh").exists() for td in tomodirs) >= 3)
    interrupted = {td: _state(td) for td in tomodirs}

    out = json.loads(run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env).stdout)
    assert not out["problems"]
    for td in tomodirs:
        after = _state(td)
        assert interrupted[td] in (before[td], after), f"{td.name} was left half retrieved"
        assert {k: after[k] for k in before[td]} == before[td], "the inputs are unchanged"
        assert discover.classify(td) == discover.Done(td) and not td.with_suffix(".crh").exists()
        assert not list(td.glob(".crh-retrieved-*"))
    assert not [p.name for p in lab.tree.iterdir() if p.name.startswith(".")], "nothing left beside the tomodirs"
    assert lab.sql("SELECT count(*) FROM inversions WHERE downloaded") == [(len(tomodirs),)]
    lab.check_invariants({job_id: "finished" for job_id in ids})
