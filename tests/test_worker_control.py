"""A worker obeys its CPU budget, the admin's requests and node settings in the database,
and records what computed each result."""

from __future__ import annotations

import json
import socket
import subprocess

import psycopg

from cr_queue.tomodir import synth

from .conftest import run, script
from .faults import wait_for



def _sleepy(tree, n, seconds, **kw):
    dirs = synth.make_tree(tree, n_inv=n, **kw)
    for td in dirs:
        (td / "exe" / "standin.cfg").write_text(f"sleep = {seconds}\n")
    return dirs


def test_cpu_budget_fits_jobs_by_their_threads(tmp_path, cli_env, db_url):
    _sleepy(tmp_path / "one", 3, 1.5)
    _sleepy(tmp_path / "two", 2, 1.5, seed=1)
    synth.make_tree(tmp_path / "huge", n_inv=1, seed=2)
    run([script("crh_add")], cli_env, cwd=tmp_path / "one")
    run([script("crh_add"), "--threads", "2"], cli_env, cwd=tmp_path / "two")
    run([script("crh_add"), "--threads", "4"], cli_env, cwd=tmp_path / "huge")
    out = json.loads(run([script("crh_worker"), "-q", "--cpus", "3", "--json", "--poll", "0.5"], cli_env).stdout)
    assert out["finished"] == 5
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT threads, datetime_started, datetime_finished FROM inversions WHERE status = 'finished'"
        ).fetchall()
        # The 4-thread job never fits a 3-CPU budget: it waits for a bigger node.
        assert conn.execute("SELECT status FROM inversions WHERE threads = 4").fetchone()[0] == "queued"
    moments = sorted({r[1] for r in rows})
    peak = max(sum(t for t, start, end in rows if start <= m < end) for m in moments)
    assert 1 < peak <= 3


def _requested_while_running(cli_env, conn, name, request, timeout):
    """Starts crh_worker `name`, and once one job runs sets its `requested` (stop or drain)
    in the database; the worker must then exit 0. Returns its --json report."""
    proc = subprocess.Popen(
        [script("crh_worker"), "--name", name, "--json", "--poll", "0.5"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: conn.execute("SELECT count(*) FROM inversions WHERE status = 'running'").fetchone()[0] == 1, "a running job")
        conn.execute("UPDATE workers SET requested = %s WHERE name = %s", (request, name))
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return json.loads(out)


def test_admin_drain_and_stop_through_the_database(tmp_path, cli_env, db_url):
    _sleepy(tmp_path, 2, 30)
    run([script("crh_add")], cli_env, cwd=tmp_path)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert _requested_while_running(cli_env, conn, "node-a", "stop", timeout=30)["released"] == 1
        state, reason = conn.execute("SELECT state, stop_reason FROM workers WHERE name = 'node-a'").fetchone()
        assert state == "stopped" and "admin" in reason
        # Given back without burning a try.
        assert conn.execute("SELECT count(*) FROM inversions WHERE status = 'queued' AND tries = 0").fetchone()[0] == 2

    for td in tmp_path.rglob("standin.cfg"):
        td.write_text("sleep = 1\n")
    with psycopg.connect(db_url, autocommit=True) as conn:
        # The running job was allowed to finish (its input still sleeps 30 s), the other never started.
        assert _requested_while_running(cli_env, conn, "node-b", "drain", timeout=60)["finished"] == 1
        assert conn.execute("SELECT count(*) FROM inversions WHERE status = 'queued'").fetchone()[0] == 1


def test_inactive_node_claims_nothing_until_reactivated(tmp_path, cli_env, db_url):
    synth.make_tree(tmp_path / "tree", n_mod=2)
    run([script("crh_add")], cli_env, cwd=tmp_path / "tree")
    host = socket.gethostname()
    err_path = tmp_path / "worker.err"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO node_settings (host, active, nice) VALUES (%s, false, 5)", (host,))
        with open(err_path, "wb") as err_file:
            proc = subprocess.Popen(
                [script("crh_worker"), "-q", "--json", "--poll", "0.3", "--log-level", "info"],
                env=cli_env, stdout=subprocess.PIPE, stderr=err_file, text=True,
            )
        try:
            # Synchronised on events: the worker says it read the inactive setting
            # (before its slots start), then beats again: its slots have been
            # going round (every 0.3 s) for a heartbeat's time without claiming.
            wait_for(
                lambda: "claiming no more jobs" in err_path.read_text() or proc.poll() is not None,
                "the worker to report its node inactive",
            )
            assert proc.poll() is None, err_path.read_text()
            first = conn.execute("SELECT max(last_heartbeat) FROM workers").fetchone()[0]
            wait_for(
                lambda: conn.execute("SELECT max(last_heartbeat) FROM workers").fetchone()[0] > first
                or proc.poll() is not None,
                "a heartbeat of the inactive worker",
            )
            assert conn.execute("SELECT count(*) FROM inversions WHERE status = 'queued'").fetchone()[0] == 2
            assert proc.poll() is None, err_path.read_text()
            conn.execute("UPDATE node_settings SET active = true WHERE host = %s", (host,))
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err_path.read_text()
        assert json.loads(out)["finished"] == 2


def test_events_record_what_computed_the_result(tmp_path, cli_env, db_url):
    synth.make_tree(tmp_path, n_both=1)
    bad = synth.make_tomodir(tmp_path / "bad", "mod")
    (bad / "exe" / "standin.cfg").write_text("fail = error_dat\n")
    run([script("crh_add"), "--threads", "2"], cli_env, cwd=tmp_path)
    run([script("crh_worker"), "-q"], cli_env)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT e.event, e.detail, e.host, e.pid, e.db_role, e.os_user FROM events e "
            "WHERE e.event IN ('finished', 'failed') ORDER BY e.job_id"
        ).fetchall()
    assert {r[0] for r in rows} == {"finished", "failed"}
    for event, detail, host, pid, role, os_user in rows:
        assert host == socket.gethostname() and pid and role and os_user
        assert detail["threads"] == 2 and detail["elapsed_s"] > 0
        assert detail["log_tail"], detail
        for info in detail["solvers"].values():
            assert len(info["sha256"]) == 64 and info["path"]
    finished = next(d for e, d, *_ in rows if e == "finished")
    assert set(finished["solvers"]) == {"crmod", "crtomo"}
