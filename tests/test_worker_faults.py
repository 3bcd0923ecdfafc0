"""Worker faults of issue 14, each reproduced for real before its fix.

Real crh_worker processes, the stand-in solvers (or tiny solver scripts in the
test's own directory), the suite's PostgreSQL stopped and started for real.
Waits are on events (a log line, a pid, a job's state), never on a sleep that
hopes something happened; the only sleep is the length of an outage itself.
"""

from __future__ import annotations

import time

from .faults import standin_alive, wait_for

OUTAGE_S = 15.0


def test_database_outage_longer_than_one_retry_is_ridden_out_and_no_result_is_lost(lab, pg_cluster):
    # Defect 1: when a reconnect itself failed, every slot died and the results were thrown away.
    ids = lab.add(*lab.tomodirs(4, cfg="sleep = 2"))
    workers = [lab.worker(f"w{i}", "--jobs", "2") for i in range(2)]
    solves = lab.wait_runs(4)

    pg_cluster.stop()
    down = time.monotonic()
    try:
        # The solvers end during the outage: their results must wait on the node.
        wait_for(lambda: not any(standin_alive(s.pid) for s in solves), "the solvers to finish during the outage")
        for w in workers:
            w.wait_log("connection lost")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))  # the outage itself
        assert all(w.proc.poll() is None for w in workers), [w.log() for w in workers]
    finally:
        pg_cluster.start()

    for job_id in ids:
        lab.wait_status(job_id, "finished", timeout=120)
    assert all(w.proc.poll() is None for w in workers), "a worker ended during the outage"
    results = [w.stop() for w in workers]
    assert [code for code, _ in results] == [0, 0], [w.log() for w in workers]
    assert sum(report["finished"] for _, report in results) == 4
    assert sum(report["refused"] + report["released"] for _, report in results) == 0
    assert len(lab.runs()) == 4, "each job was solved once: no solver work was thrown away"
    assert lab.sql("SELECT count(*) FROM events WHERE event IN ('rescued', 'released')") == [(0,)]
    for w in workers:
        assert "Traceback" not in w.log(), w.log()
    lab.check_invariants({i: "finished" for i in ids})


def test_quit_when_empty_worker_started_after_a_crash_runs_the_lost_job(lab):
    # Defect 3: the -q worker's slots found nothing to claim before the first rescue
    # sweep, so it stopped ("queue empty") and left the crashed worker's job behind.
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 2"))
    crashed = lab.worker("crashed")
    [first] = lab.wait_runs(1)
    assert lab.status(job_id) == "running"
    crashed.kill9()

    code, report = lab.worker("pilot", "-q").finish()

    assert code == 0 and report["finished"] == 1, report
    job = lab.job(job_id)
    assert (job["status"], job["attempt"]) == ("finished", 2)
    assert lab.events(job_id) == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]
    assert len(lab.runs()) == 2 and not standin_alive(first.pid)
    lab.check_invariants({job_id: "finished"})
