"""The database restarts, the network half-dies (issue 3).

A restart of the suite's PostgreSQL while solvers run must cost nothing: the
workers reconnect, their solvers keep running and their results are
accepted.  A worker cut off behind a frozen TCP proxy (frozen in the middle
of a lease renewal, its transaction open on the server) loses its job to
another worker once its lease runs out; it stops its own solver after half a
lease without news, and whatever it sends when the network comes back is
refused.  A completion that committed but whose answer was lost is retried
and recognised.
"""

from __future__ import annotations

import json
import signal
import threading

import psycopg

from .conftest import run, script
from .faults import proxy_url, standin_alive, wait_for


def _wrapper(path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_database_restart_while_solvers_run_costs_nothing(lab, pg_cluster):
    ids = lab.add(*lab.tomodirs(4, cfg="sleep = 4"))
    workers = [lab.worker(f"w{i}", "-q", "--jobs", "2") for i in range(2)]
    lab.wait_runs(4)

    pg_cluster.restart()

    results = [w.finish() for w in workers]
    # Nothing was taken away from workers that were only waiting for the database.
    lab.check_each_solved_once(workers, results, 4, "each job was solved once: no solver was stopped or run again")
    assert {row[0] for row in lab.sql("SELECT attempt FROM inversions")} == {1}
    assert any("connection lost" in w.log() for w in workers), "the restart was not noticed at all"
    lab.check_invariants({i: "finished" for i in ids})


def test_database_outage_while_solvers_run_results_uploaded_when_it_is_back(lab, pg_cluster):
    ids = lab.add(*lab.tomodirs(2, cfg="sleep = 2"))
    workers = [lab.worker(f"w{i}", "-q") for i in range(2)]
    solves = lab.wait_runs(2)

    pg_cluster.stop()
    try:
        # Down long enough for reconnects to fail and for the solvers to finish meanwhile.
        for w in workers:
            w.wait_log("control connection lost")
            w.wait_log("reconnecting in 2 s")
        wait_for(lambda: not any(standin_alive(s.pid) for s in solves), "the solvers to finish during the outage")
    finally:
        pg_cluster.start()

    results = [w.finish() for w in workers]
    lab.check_each_solved_once(workers, results, 2, "each job was solved once: the results waited out the outage")
    lab.check_invariants({i: "finished" for i in ids})


def test_add_and_retrieve_with_the_database_down_fail_clearly_and_change_nothing(lab, pg_cluster):
    [done] = lab.tomodirs(1, cfg="sleep = 0")
    [done_id] = lab.add(done)
    code, _ = lab.worker("w", "-q").finish()
    assert code == 0
    [td] = lab.tomodirs(1, cfg="sleep = 0")
    pg_cluster.stop()
    try:
        add = run([script("crh_add"), str(td)], lab.env, check=2)
        retrieve = run([script("crh_retrieve"), str(done)], lab.env, check=2)
    finally:
        pg_cluster.start()
    for proc in (add, retrieve):
        assert "cannot connect to the database" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not td.with_suffix(".crh").exists()
    assert done.with_suffix(".crh").exists() and not (done / "mod" / "volt.dat").exists()
    # Once the database is back, both simply work.
    [td_id] = lab.add(td)
    report = json.loads(run([script("crh_retrieve"), "--json", str(done)], lab.env).stdout)
    assert [i["job_id"] for i in report["retrieved"]] == [done_id]
    lab.check_invariants({done_id: "finished", td_id: "queued"})


# The renewal of a lease, which the worker sends inside a short transaction.
RENEWAL = b"crh_renew("


def _freeze_inside_a_renewal(proxy) -> None:
    """Freeze right after a lease renewal reached the database, before its COMMIT.

    The cut-off worker's transaction stays open on the server with the job's row
    locked, which is what a network cut at the wrong moment does; "half a lease
    without news" is measured from here.
    """
    proxy.freeze_after(RENEWAL)
    wait_for(proxy.triggered.is_set, "a lease renewal to pass the proxy")


def test_cut_off_worker_loses_the_job_and_its_late_completion_is_refused(lab, proxy, tmp_path):
    # Worker a's solver holds at a gate after solving, so the test can cut the
    # network at the moment the result is about to be sent.
    gate = tmp_path / "gate"
    gate.mkdir()
    solver = _wrapper(
        tmp_path / "bin" / "CRMod",
        f'"{script("crh_standin_crmod")}"; rc=$?\n'
        f'touch "{gate}/solved"\n'
        f'while [ ! -e "{gate}/go" ]; do sleep 0.05; done\n'
        "exit $rc",
    )
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))
    cut_env = {**lab.env, "CRH_DATABASE_URL": proxy_url(proxy, lab.db_url), "CRH_CRMOD": str(solver)}
    a = lab.worker("a", "--lease", "6", env=cut_env)
    wait_for(lambda: (gate / "solved").exists(), "a's solver to finish")

    _freeze_inside_a_renewal(proxy)
    (gate / "go").touch()
    b = lab.worker("b")
    job = lab.wait_status(job_id, "finished")
    assert job["attempt"] == 2
    assert lab.events(job_id) == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]

    proxy.unfreeze()
    a.wait_log("the database refused")
    code, report = a.stop()
    assert code == 0 and report["refused"] == 1 and report["finished"] == 0, a.log()
    code, report = b.stop()
    assert code == 0 and report["finished"] == 1
    finished_by = lab.sql(
        "SELECT w.name, e.attempt FROM events e JOIN workers w ON w.id = e.worker_id "
        "WHERE e.job_id = %s AND e.event = 'finished'",
        (job_id,),
    )
    assert finished_by == [("b", 2)]
    lab.check_invariants({job_id: "finished"})


def test_cut_off_worker_stops_its_solver_after_half_a_lease(lab, proxy, tmp_path):
    # Worker a's solver would run for two minutes; worker b's finishes at once.
    solver = _wrapper(tmp_path / "bin" / "CRMod", f'CRH_STANDIN_SLEEP=120 exec "{script("crh_standin_crmod")}"')
    [job_id] = lab.add(*lab.tomodirs(1, cfg="fail = none"))
    cut_env = {**lab.env, "CRH_DATABASE_URL": proxy_url(proxy, lab.db_url), "CRH_CRMOD": str(solver)}
    a = lab.worker("a", "--lease", "6", env=cut_env)
    [solve] = lab.wait_runs(1)

    _freeze_inside_a_renewal(proxy)
    # Nobody can tell worker a anything now: it must give up on its own.
    wait_for(lambda: not standin_alive(solve.pid), "the cut-off worker to stop its own solver", timeout=30)
    a.wait_log("could not renew the leases")

    b = lab.worker("b")
    job = lab.wait_status(job_id, "finished")
    assert job["attempt"] == 2
    proxy.unfreeze()
    code, report = a.stop()
    assert code == 0 and report["finished"] == 0 and report["refused"] == 1, a.log()
    code, report = b.stop()
    assert code == 0 and report["finished"] == 1
    lab.check_invariants({job_id: "finished"})



def test_completion_whose_answer_is_lost_is_retried_and_counted_once(lab, proxy):
    # The connection drops right after the completion reached the database and
    # committed, before the answer came back: the worker must retry, and the
    # retry must recognise the completion as its own rather than as a refusal.
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))
    proxy.cut_after(b"crh_complete(")
    w = lab.worker("w", "-q", env={**lab.env, "CRH_DATABASE_URL": proxy_url(proxy, lab.db_url)})

    code, report = w.finish()

    assert proxy.triggered.is_set()
    assert "database unreachable" in w.log(), "the completion was not retried"
    assert code == 0 and report["finished"] == 1 and report["refused"] == 0, w.log()
    lab.check_invariants({job_id: "finished"})


def test_a_server_that_dies_with_a_query_unread_resets_the_client_through_the_proxy(proxy, lab, db_url):
    # The fault harness itself: a backend that dies with bytes still unread makes the
    # proxy's read fail (ECONNRESET).  The proxy used to end that direction silently and
    # leave the client's socket open, a half-dead connection no real network makes: the
    # client waited for ever, and so did the CI fault run's proxied worker (seed 369524).
    conn = psycopg.connect(proxy_url(proxy, lab.db_url), autocommit=True)
    pid = conn.info.backend_pid
    outcome: list[BaseException | None] = []

    def pipelined() -> None:
        try:
            with conn.pipeline():
                conn.execute("SELECT pg_sleep(3)")
                for _ in range(50):  # queued behind the sleep, unread when the backend dies
                    conn.execute("SELECT 1")
            outcome.append(None)
        except psycopg.OperationalError as exc:
            outcome.append(exc)

    client = threading.Thread(target=pipelined, daemon=True)
    client.start()
    wait_for(
        lambda: lab.sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE 'SELECT pg_sleep%%'", (pid,))
        == [(1,)],
        "the sleep to run",
    )
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    client.join(30)
    assert not client.is_alive(), "the client never heard that its server was gone"
    assert isinstance(outcome[0], psycopg.OperationalError), outcome
    conn.close()


def test_a_worker_told_twice_to_stop_is_gone_in_time_when_the_database_does_not_answer(lab, proxy, tmp_path):
    # A statement on a connection whose other end went silent never returns: told to
    # give its jobs back now, the worker exits after its grace anyway (exit 4), saying
    # which jobs it could not give back; their leases bring them back.
    solver = _wrapper(tmp_path / "bin" / "CRMod", f'CRH_STANDIN_SLEEP=120 exec "{script("crh_standin_crmod")}"')
    [job_id] = lab.add(*lab.tomodirs(1, cfg="fail = none"))
    a = lab.worker("a", "--lease", "6", env={**lab.env, "CRH_DATABASE_URL": proxy_url(proxy, lab.db_url), "CRH_CRMOD": str(solver)})
    [solve] = lab.wait_runs(1)

    proxy.freeze()
    try:
        a.signal(signal.SIGTERM)
        a.wait_log("received SIGTERM:")
        a.signal(signal.SIGTERM)
        a.wait_log("received SIGTERM again")
        wait_for(lambda: not standin_alive(solve.pid), "the solver to be stopped at once")
        code = a.proc.wait(timeout=60)
    finally:
        proxy.unfreeze()
    assert code == 4, a.log()
    assert f"the jobs not given back ({job_id})" in a.log() and "Thread" in a.log(), a.log()

    b = lab.worker("b", "-q")
    code, report = b.finish()
    assert code == 0 and report["finished"] == 1, b.log()
    lab.check_invariants({job_id: "finished"})
