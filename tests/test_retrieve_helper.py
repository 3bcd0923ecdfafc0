"""crh_retrieve's helper process: it shares the work, and its death costs nothing a rerun does not bring back."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

from cr_queue import retrieve, retrieve_helper
from cr_queue.tomodir import archive, discover
from cr_queue import store
from cr_queue.db.connection import Database

from .conftest import run, script
from .faults import alive, wait_for

N = retrieve_helper.MIN_TOMODIRS + 8


def _finished_tree(lab, n: int) -> tuple[list[Path], list[int]]:
    tomodirs = lab.tomodirs(n, cfg="sleep = 0")
    ids = lab.add()
    code, report = lab.worker("w", "-q", "-j", "2").finish()
    assert code == 0 and report["finished"] == n
    return tomodirs, ids


def _retrieved(tomodirs: list[Path]) -> None:
    for td in tomodirs:
        assert discover.classify(td) == discover.Done(td), td
        assert not td.with_suffix(".crh").exists()
        assert not [p for p in td.parent.iterdir() if p.name.startswith(f".{td.name}.crh-")], "nothing left beside it"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_the_helper_and_the_parent_share_the_tomodirs_and_the_parent_reports_all(lab):
    tomodirs, ids = _finished_tree(lab, N)
    out = json.loads(run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env).stdout)

    assert not out["problems"] and not out["failed"]
    assert [Path(i["path"]) for i in out["retrieved"]] == tomodirs, "in the tree's order, each once"
    assert sorted(i["job_id"] for i in out["retrieved"]) == sorted(ids)
    _retrieved(tomodirs)
    by_pid = lab.sql("SELECT pid, count(*) FROM events WHERE event = 'downloaded' GROUP BY pid")
    assert len(by_pid) == 2, f"two processes flagged jobs downloaded: {by_pid}"
    assert sum(n for _pid, n in by_pid) == N
    assert lab.sql("SELECT count(*) FROM inversions WHERE downloaded") == [(N,)]


def test_too_few_tomodirs_for_a_helper_are_brought_back_by_one_process(lab):
    tomodirs, _ids = _finished_tree(lab, retrieve_helper.MIN_TOMODIRS - 1)
    out = json.loads(run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env).stdout)
    assert len(out["retrieved"]) == len(tomodirs) and not out["problems"]
    _retrieved(tomodirs)
    assert len(lab.sql("SELECT DISTINCT pid FROM events WHERE event = 'downloaded'")) == 1


def test_kill9_of_the_helper_reports_what_it_had_taken_and_a_rerun_brings_it_back(lab):
    tomodirs, ids = _finished_tree(lab, N)
    retrieve = lab.run_until_paused([script("crh_retrieve"), "--json", str(lab.tree)], retrieve_helper.PAUSE_TOOK)
    [helper] = wait_for(lambda: _children(retrieve.pid), "crh_retrieve's helper process")
    os.kill(helper, signal.SIGKILL)
    stdout, _stderr = retrieve.communicate(timeout=120)
    assert not alive(helper)

    out = json.loads(stdout)
    assert retrieve.returncode == 1, "a tomodir was not brought back"
    lost = [p for p in out["problems"] if "helper process ended early (killed by signal 9)" in p]
    assert lost and len(lost) == len(out["problems"]), out["problems"]
    assert len(out["retrieved"]) + len(lost) == N, "everything else was brought back by the parent"
    left = [td for td in tomodirs if td.with_suffix(".crh").exists()]
    assert len(left) == len(lost) and all(str(td.with_suffix(".crh")) in " ".join(lost) for td in left)

    again = json.loads(run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(i["job_id"] for i in again["retrieved"]) == sorted(
        i for i in ids if i not in {r["job_id"] for r in out["retrieved"]}
    )
    assert not again["problems"]
    _retrieved(tomodirs)
    assert lab.sql("SELECT count(*) FROM inversions WHERE downloaded") == [(N,)]


def test_a_refused_fork_leaves_the_work_to_this_process(lab, monkeypatch):
    tomodirs, _ids = _finished_tree(lab, N)

    def refuse() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(retrieve_helper, "wanted", lambda tomodirs, processes: True)  # pytest's own threads aside
    db = Database(url=lab.env["CRH_DATABASE_URL"], source="test", embedded=False, store=store.DATABASE)
    report = retrieve.retrieve(db, [lab.tree], limits=archive.Limits(), processes=2)
    assert [item.path for item in report.retrieved] == tomodirs and not report.problems
    _retrieved(tomodirs)


def test_the_helper_losing_the_database_says_so_in_one_line_and_a_rerun_brings_all_back(lab, tmp_path):
    """Found by the fault run (seed 1): a database stopped under crh_retrieve made its
    helper print a traceback (AdminShutdown) instead of a line a person can act on."""
    tomodirs, ids = _finished_tree(lab, N)
    go = tmp_path / "go"
    retrieve = lab.run_until_paused(
        [script("crh_retrieve"), "--json", str(lab.tree)], retrieve_helper.PAUSE_TOOK, until=go
    )
    [helper] = wait_for(lambda: _children(retrieve.pid), "crh_retrieve's helper process")
    # What `pg_ctl stop -m fast` does to every session, done to the helper's alone (the
    # parent, ending first, would take the helper with it): its connection, open while
    # it is paused, is ended by the server.
    ended = lab.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s",
        (retrieve_helper.HELPER_APPLICATION,),
    )
    assert ended and all(ok for (ok,) in ended)
    go.touch()
    stdout, stderr = retrieve.communicate(timeout=120)

    assert "Traceback" not in stderr, stderr
    assert "crh_retrieve's helper process: lost the connection to the database" in stderr, stderr
    assert retrieve.returncode in (1, 2), (retrieve.returncode, stderr)
    assert not alive(helper)

    again = run([script("crh_retrieve"), "--json", str(lab.tree)], lab.env, check=None)
    assert again.returncode == 0, again.stderr
    assert not json.loads(again.stdout)["problems"]
    _retrieved(tomodirs)
    assert lab.sql("SELECT count(*) FROM inversions WHERE downloaded") == [(len(ids),)]
