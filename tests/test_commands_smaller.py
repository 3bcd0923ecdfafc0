"""The smaller items of issue 19 (item 5): what the commands say, each shown by a real run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from .conftest import run, script
from .faults import wait_for


def test_demo_says_its_jobs_stay_in_the_database(cli_env, db_url):
    done = run([script("crh"), "demo", "--db", db_url], cli_env, timeout=300)
    assert "demo OK: 6 of 6" in done.stdout
    assert "the demo's 6 jobs stay in the database" in done.stdout


def test_show_of_a_retrieved_tomodir_says_it_was_retrieved(lab):
    [td] = lab.tomodirs(1, cfg="sleep = 0")
    [job_id] = lab.add()
    code, _ = lab.worker("w", "-q").finish()
    assert code == 0
    run([script("crh_retrieve"), str(lab.tree)], lab.env)
    assert not td.with_suffix(".crh").exists()
    # A finished tomodir receives the solver's log too, and the user guide says so.
    assert (td / "exe" / "crh_solver.log").exists()
    guide = " ".join((Path(__file__).parents[1] / "docs" / "user-guide.md").read_text().split())
    assert "A finished tomodir receives `exe/crh_solver.log` too" in guide

    shown = run([script("crh"), "show", str(td)], lab.env)
    assert f"job {job_id}: finished, retrieved " in shown.stdout
    assert "was it added" not in shown.stdout + shown.stderr
    # A directory nothing was added from still says what to do.
    (lab.tmp_path / "never").mkdir()
    never = run([script("crh"), "show", str(lab.tmp_path / "never")], lab.env, check=2)
    assert "not added with crh_add, or retrieved already" in never.stderr


def test_a_solver_without_its_output_is_reported_in_plain_words(lab):
    [td] = lab.tomodirs(1, kind="inv", cfg="sleep = 0\nfail = missing_output")
    [job_id] = lab.add()
    code, _ = lab.worker("w", "-q").finish()
    assert code == 0
    reason = lab.job(job_id)["failure_reason"]
    assert "exited 0 without writing inv/inv.ctr ending in ***finished***" in reason, reason
    assert "no an" not in reason


def test_hints_when_crh_add_or_crh_retrieve_find_nothing(lab):
    empty = lab.tmp_path / "empty"
    empty.mkdir()
    added = run([script("crh_add"), str(empty)], lab.env)
    assert f"no tomodir found below {empty}" in added.stderr and "exe/, config/" in added.stderr
    got = run([script("crh_retrieve"), str(empty)], lab.env)
    assert f"no .crh file below {empty}" in got.stderr and "where you ran crh_add" in got.stderr


def test_cancel_prints_a_summary_and_retrieve_counts_the_cancelled(lab):
    lab.tomodirs(2, cfg="sleep = 0")
    ids = lab.add()
    cancelled = run([script("crh_cancel"), str(lab.tree), str(ids[0])], lab.env)
    assert "2 job(s) cancelled, 0 not" in cancelled.stdout, cancelled.stdout
    got = run([script("crh_retrieve"), str(lab.tree)], lab.env)
    assert "0 retrieved, 0 failed, 2 cancelled, 0 still pending" in got.stdout, got.stdout


def _status(lab) -> dict:
    return json.loads(run([script("crh_status"), "--json"], lab.env).stdout)


def test_status_stops_counting_a_killed_workers_slots(lab):
    worker = lab.worker("slots", "--jobs", "3")
    wait_for(lambda: _status(lab)["workers"]["live"] == 1, "the worker to show as live")
    assert _status(lab)["estimate"]["slots"] == 3
    worker.signal(signal.SIGKILL)
    worker.proc.wait()
    # Its heartbeat stops and its liveness lock goes with its connection: lost within
    # the rescue grace, not after the minute a stale heartbeat alone takes.
    wait_for(lambda: _status(lab)["workers"]["live"] == 0, "the killed worker to count as lost", timeout=30)
    report = _status(lab)
    assert report["workers"]["lost"] == 1 and report["estimate"]["slots"] == 0
