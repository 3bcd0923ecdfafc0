"""Faults of the worker and its solver, injected for real (issue 3).

Each test runs real crh_worker processes with the stand-in solver against
the suite's PostgreSQL, injects one fault (kill -9, a hanging or vanishing
solver, signals, a cancel, a walltime) and ends with the shared invariant
check: nothing finished twice, nothing lost, no stale result accepted,
nothing left behind.
"""

from __future__ import annotations

import json
import signal

from .conftest import run, script
from .faults import solver_script, standin_alive, wait_for


def test_kill9_of_a_worker_mid_solve_requeues_the_job_for_another_worker(lab):
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 3"))
    a = lab.worker("a")
    [first] = lab.wait_runs(1)
    assert first.worker_pid == a.pid
    b = lab.worker("b")
    b.wait_log("worker b (id")

    a.kill9()

    wait_for(lambda: not standin_alive(first.pid), "the killed worker's solver to die with it")
    job = lab.wait_status(job_id, "finished")
    assert job["attempt"] == 2 and job["tries"] == 2
    assert lab.events(job_id) == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]
    rescued = lab.sql("SELECT status, attempt FROM events WHERE job_id = %s AND event = 'rescued'", (job_id,))
    assert rescued == [("queued", 1)]
    finished_by = lab.sql(
        "SELECT w.name FROM events e JOIN workers w ON w.id = e.worker_id WHERE e.job_id = %s AND e.event = 'finished'",
        (job_id,),
    )
    assert finished_by == [("b",)]
    second = lab.runs()[1]
    assert second.worker_pid == b.pid and second.job_id == job_id
    code, report = b.stop()
    assert code == 0 and report["finished"] == 1
    lab.check_invariants({job_id: "finished"})


def test_hanging_solver_is_killed_with_its_process_group_at_the_timeout(lab):
    # The stand-in runs as a grandchild of the worker (forked by a shell that
    # waits for it): only a kill of the whole process group reaches it.
    wrapper = solver_script(lab.tmp_path / "bin" / "CRMod", f'"{script("crh_standin_crmod")}" &\nwait $!')
    env = {**lab.env, "CRH_CRMOD": str(wrapper)}
    [job_id] = lab.add(*lab.tomodirs(1, cfg="fail = hang"))
    w = lab.worker("w", "-q", "--timeout", "2", env=env)
    [hung] = lab.wait_runs(1)

    code, report = w.finish()

    assert code == 0 and report["failed"] == 1
    job = lab.job(job_id)
    assert job["status"] == "failed" and job["failure_category"] == "timeout", job
    assert "process group was killed" in job["failure_reason"]
    assert job["tries"] == 1, "a solver failure is not retried automatically"
    assert not standin_alive(hung.pid)
    lab.check_invariants({job_id: "failed"})


def test_worker_with_a_missing_or_unexecutable_solver_refuses_to_start(lab):
    [job_id] = lab.add(*lab.tomodirs(1, kind="inv"))
    missing = lab.tmp_path / "bin" / "CRTomo-missing"
    not_executable = solver_script(lab.tmp_path / "bin" / "CRTomo", "exit 0")
    not_executable.chmod(0o644)
    for binary, words in ((missing, "does not exist"), (not_executable, "not an executable")):
        env = {**lab.env, "CRH_CRTOMO": str(binary)}
        proc = run([script("crh_worker"), "-q", "--workdir", str(lab.workdir)], env, check=2)
        assert str(binary) in proc.stderr and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert lab.sql("SELECT count(*) FROM workers") == [(0,)], "a worker that refuses to start registers nothing"
    lab.check_invariants({job_id: "queued"})


def test_solver_unexecutable_after_start_stops_the_node_without_burning_tries(lab):
    solver = solver_script(lab.tmp_path / "bin" / "CRMod", f'exec "{script("crh_standin_crmod")}"')
    env = {**lab.env, "CRH_CRMOD": str(solver)}
    w = lab.worker("w", "--max-node-failures", "2", env=env)
    w.wait_log("worker w (id")
    solver.chmod(0o644)
    ids = lab.add(*lab.tomodirs(3, cfg="sleep = 0"))

    code, report = w.finish()

    assert code == 3, w.log()
    assert report["finished"] == 0 and report["failed"] == 0 and report["released"] == 2
    assert "node broken" in report["stop_reason"] and "node broken" in w.log()
    [(state, reason)] = lab.sql("SELECT state, stop_reason FROM workers")
    assert state == "stopped" and "node broken" in reason and str(solver) in reason
    rows = lab.sql("SELECT status, tries FROM inversions ORDER BY id")
    assert rows == [("queued", 0)] * 3, rows
    lab.check_invariants({i: "queued" for i in ids})

    # The jobs were fine: a healthy node runs each of them once.
    solver.chmod(0o755)
    code, report = lab.worker("healthy", "-q", env=env).finish()
    assert code == 0 and report["finished"] == 3
    assert [r[0] for r in lab.sql("SELECT tries FROM inversions")] == [1, 1, 1]
    lab.check_invariants({i: "finished" for i in ids})


def test_sigterm_lets_the_running_job_finish_claims_no_more_and_exits_0(lab):
    running, waiting = lab.add(*lab.tomodirs(2, cfg="sleep = 3"))
    w = lab.worker("w")
    lab.wait_runs(1)

    w.signal(signal.SIGTERM)
    code, report = w.finish()

    assert code == 0 and report["finished"] == 1 and report["released"] == 0
    assert "stopped by SIGTERM" in report["stop_reason"]
    assert len(lab.runs()) == 1, "nothing is claimed after SIGTERM"
    assert lab.job(waiting)["tries"] == 0
    lab.check_invariants({running: "finished", waiting: "queued"})


def test_sigterm_with_drain_timeout_gives_the_job_back_as_queued(lab):
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 120"))
    w = lab.worker("w", "--drain-timeout", "1")
    [solve] = lab.wait_runs(1)

    w.signal(signal.SIGTERM)
    code, report = w.finish()

    assert code == 0 and report["released"] == 1 and report["finished"] == 0
    job = lab.job(job_id)
    assert (job["status"], job["tries"], job["attempt"]) == ("queued", 0, 1)
    assert lab.events(job_id)[-1] == "released"
    assert not standin_alive(solve.pid)
    lab.check_invariants({job_id: "queued"})


def test_second_sigterm_gives_everything_back_at_once(lab):
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 120"))
    w = lab.worker("w")
    [solve] = lab.wait_runs(1)

    w.signal(signal.SIGTERM)
    w.wait_log("received SIGTERM: claiming no more")
    assert lab.status(job_id) == "running"
    w.signal(signal.SIGTERM)
    code, report = w.finish()

    assert code == 0 and report["released"] == 1
    assert "received SIGTERM again" in w.log()
    job = lab.job(job_id)
    assert (job["status"], job["tries"]) == ("queued", 0)
    assert not standin_alive(solve.pid)
    lab.check_invariants({job_id: "queued"})


def test_cancel_of_a_running_job_kills_the_solver_and_retrieve_reports_it(lab):
    [td] = lab.tomodirs(1, cfg="sleep = 120")
    [job_id] = lab.add(td)
    w = lab.worker("w")
    [solve] = lab.wait_runs(1)

    out = run([script("crh_cancel"), "--json", str(td)], lab.env)
    assert json.loads(out.stdout)["cancelled"] == [job_id]

    # The issue asks for "within 5 s"; tests do not time, bench/requeue_time.py style scripts do.
    wait_for(lambda: not standin_alive(solve.pid), "the cancelled job's solver to be killed", timeout=30)
    w.wait_log(f"job {job_id}: solver stopped, job cancelled")
    assert lab.status(job_id) == "cancelled"
    report = json.loads(run([script("crh_retrieve"), "--json"], lab.env, cwd=lab.tree).stdout)
    assert [i["job_id"] for i in report["cancelled"]] == [job_id]
    assert not report["retrieved"] and not report["failed"]
    assert not td.with_suffix(".crh").exists()
    code, wreport = w.stop()
    assert code == 0 and wreport["cancelled"] == 1 and wreport["finished"] == 0
    lab.check_invariants({job_id: "cancelled"})


def test_max_runtime_gives_back_what_cannot_finish_and_exits_0(lab):
    short = lab.tomodirs(1, cfg="sleep = 1", prefix="a_short")
    long = lab.tomodirs(1, cfg="sleep = 120", prefix="b_long")
    short_id, long_id = lab.add(*short, *long)
    w = lab.worker("w", "--jobs", "2", "--max-runtime", "8")

    code, report = w.finish()

    assert code == 0, w.log()
    assert report["finished"] == 1 and report["released"] == 1
    assert report["stop_reason"] == "max runtime reached"
    job = lab.job(long_id)
    assert (job["status"], job["tries"]) == ("queued", 0)
    lab.check_invariants({short_id: "finished", long_id: "queued"})
