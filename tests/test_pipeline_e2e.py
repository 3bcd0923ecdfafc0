"""The whole pipeline through the real console scripts: crh_add → 2 × crh_worker → crh_retrieve."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
from collections import Counter
from pathlib import Path

import psycopg

from cr_queue.tomodir import discover
from cr_queue.tomodir import synth

from .conftest import run, script


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_twenty_tomodirs_two_workers_each_runs_exactly_once(tmp_path, cli_env, db_url):
    tree = tmp_path / "tree"
    tomodirs = synth.make_tree(tree, n_mod=8, n_inv=8, n_both=6, seed=3)
    before = _hash_tree(tree)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**cli_env, "CRH_STANDIN_MARK": str(marks)}

    added = json.loads(run([script("crh_add"), "--json"], env, cwd=tree).stdout)
    assert len(added["added"]) == 22
    assert all(p.with_suffix(".crh").exists() for p in tomodirs)
    after_add = _hash_tree(tree)
    assert {k: after_add[k] for k in before} == before

    workers = [
        subprocess.Popen(
            [script("crh_worker"), "--quit-when-empty", "--jobs", "2", "--threads", "1", "--name", f"w{i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err

    # Each tomodir was solved exactly once per step.
    runs = Counter()
    for line in (marks / "runs.log").read_text().splitlines():
        _pid, solver, cwd = line.split(" ", 2)
        job = re.search(r"crh-w\d+-job(\d+)-", cwd).group(1)
        runs[(solver, job)] += 1
    assert all(count == 1 for count in runs.values()), runs
    expected_runs = 8 + 8 + 2 * 6
    assert sum(runs.values()) == expected_runs

    result = run([script("crh_retrieve"), "--json"], env, cwd=tree)
    report = json.loads(result.stdout)
    assert len(report["retrieved"]) == 22 and not report["failed"] and not report["pending"]

    # Every tomodir now holds its outputs, exactly as if the solver had run there.
    for td in tomodirs:
        assert not td.with_suffix(".crh").exists()
        assert discover.classify(td) == discover.Done(td)
        assert (td / "mod" / "volt.dat").exists()
    # Inputs are byte-identical to before.
    after = _hash_tree(tree)
    assert {k: after[k] for k in before} == before

    with psycopg.connect(db_url) as conn:
        states = conn.execute("SELECT status, downloaded, count(*) FROM inversions GROUP BY 1, 2").fetchall()
        assert states == [("finished", True, 22)]
        finished_events = conn.execute(
            "SELECT job_id, count(*) FROM events WHERE event = 'finished' GROUP BY 1"
        ).fetchall()
        assert len(finished_events) == 22 and all(n == 1 for _, n in finished_events)
        # The two workers shared the work.
        per_worker = conn.execute(
            "SELECT w.name, count(*) FROM events e JOIN workers w ON w.id = e.worker_id "
            "WHERE e.event = 'finished' GROUP BY 1"
        ).fetchall()
        assert sum(n for _, n in per_worker) == 22


def test_failing_solver_job_comes_back_with_error_dat_and_log(tmp_path, cli_env, db_url):
    tree = tmp_path / "tree"
    good = synth.make_tree(tree / "good", n_mod=2, n_inv=2)
    bad = synth.make_tomodir(tree / "bad" / "td_error", "inv")
    (bad / "exe" / "standin.cfg").write_text("fail = error_dat\n")
    crashing = synth.make_tomodir(tree / "bad" / "td_exit", "mod")
    (crashing / "exe" / "standin.cfg").write_text("fail = exit\n")

    run([script("crh_add")], cli_env, cwd=tree)
    worker = run([script("crh_worker"), "-q", "--jobs", "1"], cli_env)
    assert "failed (error_dat)" in worker.stdout and "failed (exit_code)" in worker.stdout

    result = run([script("crh_retrieve"), "--json"], cli_env, cwd=tree, check=1)
    report = json.loads(result.stdout)
    assert {Path(i["path"]).name for i in report["failed"]} == {"td_error", "td_exit"}
    assert len(report["retrieved"]) == 4
    error_dat = (bad / "exe" / "error.dat").read_text()
    assert error_dat.startswith("CRTomo PID")
    assert (bad / "exe" / "crh_solver.log").exists()
    assert "exited with status 3" in next(i["reason"] for i in report["failed"] if i["path"].endswith("td_exit"))
    assert (crashing / "exe" / "crh_solver.log").exists()
    for td in good:
        assert discover.classify(td) == discover.Done(td)

    with psycopg.connect(db_url) as conn:
        rows = dict(conn.execute("SELECT failure_category, count(*) FROM inversions WHERE status='failed' GROUP BY 1"))
        assert rows == {"error_dat": 1, "exit_code": 1}


def test_admin_queries_work_with_psql(tmp_path, cli_env, db_url):
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_mod=3)
    run([script("crh_add")], cli_env, cwd=tree)
    run([script("crh_worker"), "-q"], cli_env)
    host = socket.gethostname()
    query = (
        "select count(*) from inversions where datetime_finished >= NOW() - INTERVAL '1 HOURS' "
        f"and status='finished' and inv_computer='{host}'"
    )
    out = subprocess.run(["psql", db_url, "-At", "-c", query], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
    size = subprocess.run(
        ["psql", db_url, "-At", "-c", "SELECT pg_size_pretty(pg_total_relation_size('binary_data'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert size.stdout.strip().endswith(("bytes", "kB", "MB"))
    # Retrieval keeps the jobs 'finished' for the classic counting query.
    run([script("crh_retrieve")], cli_env, cwd=tree)
    out = subprocess.run(["psql", db_url, "-At", "-c", query], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
