"""What a fleet of workers costs the database (issue 16, its worker part).

An idle `crh_worker --jobs J` held 2 + J connections and ran several
transactions a second, and every worker swept for lost jobs every 2 s: 60 idle
workers of 4 slots could not all connect to a default server (max_connections
100).  Now an idle worker holds one connection (at most one more per job whose
input or result is in transit), costs about one transaction per poll, and one
worker of the fleet (the holder of the rescue leader lock) sweeps.

Real worker processes against real PostgreSQL; the fleet test starts a
server of its own with max_connections 100.  Waits follow events (rows, log
lines); only the measured window is a plain wait.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from cr_queue.queries import workers

from .conftest import commands_env, throwaway_server
from .faults import Lab, WorkerProc, wait_for

SWEEP_LINE = "rescue sweep:"


def worker_connections(db_url: str, name: str | None = None) -> int:
    """Connections of one worker (application_name "crh_worker NAME ROLE"), or of every worker."""
    prefix = "crh_worker " + (f"{name} " if name else "")
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, %s)", (prefix,)
        ).fetchone()[0]


def test_an_idle_worker_holds_one_connection_and_one_more_per_transfer(lab):
    w = lab.worker("fleet-a", "--jobs", "4")
    w.wait_log("worker fleet-a (id")
    # Alone, it takes the rescue leader lock at its first beat: its session is set up.
    w.wait_log("now sweeps")
    # Claim polls (--poll 0.5) and two beats go by; the count never leaves 1.
    seen = set()
    beats = set()
    while len(beats) < 3:
        seen.add(worker_connections(lab.db_url, "fleet-a"))
        beats.add(lab.sql("SELECT last_heartbeat FROM workers WHERE name = 'fleet-a'")[0][0])
    assert seen == {1}, f"an idle worker with 4 slots held {seen} connections"

    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(worker_connections(lab.db_url, "fleet-a"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ids = lab.add(*lab.tomodirs(2, cfg="sleep = 3"))
        lab.wait_runs(2)
        # Both solvers run: their inputs are in, no connection is held while they run.
        assert worker_connections(lab.db_url, "fleet-a") == 1
        for job_id in ids:
            lab.wait_status(job_id, "finished")
    finally:
        done.set()
        sampler.join()
    assert samples and max(samples) <= 1 + 2, f"with 2 jobs in transit the worker held up to {max(samples)} connections"
    wait_for(lambda: worker_connections(lab.db_url, "fleet-a") == 1, "the worker to be back to one connection")
    code, report = w.stop()
    assert code == 0 and report["finished"] == 2
    lab.check_invariants({job_id: "finished" for job_id in ids})


@pytest.fixture
def small_server():
    """A throwaway PostgreSQL with a default server's max_connections (100), migrated; removed after."""
    conf = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "100"}
    with throwaway_server("crh-fleet-pg-", conf) as (_cluster, url):
        yield url


def _xacts(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()[0]


def test_sixty_idle_workers_of_four_slots_fit_a_default_server_and_cost_it_little(small_server, tmp_path):
    n = 60
    lab = Lab(tmp_path, commands_env(small_server, tmp_path), small_server)
    try:
        fleet: list[WorkerProc] = []
        # Started ten at a time (each command's schema check is a connection of its own for a moment).
        for first in range(0, n, 10):
            for i in range(first, first + 10):
                fleet.append(lab.worker(f"fl{i:02d}", "--jobs", "4", "--poll", "5"))
            wait_for(
                lambda: lab.sql("SELECT count(*) FROM workers WHERE state = 'running'")[0][0] == first + 10
                or any(w.proc.poll() is not None for w in fleet),
                f"workers up to fl{first + 9:02d} to register",
                timeout=300,
            )
        assert all(w.proc.poll() is None for w in fleet), [w.log() for w in fleet if w.proc.poll() is not None][:1]
        # Settled: every worker holds its liveness lock (its session is set up) and has beaten since.
        wait_for(
            lambda: lab.sql(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s AND objsubid = 2",
                (workers.LOCK_NAMESPACE,),
            )[0][0] == n,
            "every worker to hold its liveness lock",
            timeout=300,
        )
        wait_for(
            lambda: lab.sql("SELECT count(*) FROM workers WHERE last_heartbeat > datetime_started + interval '1 s'")[0][0] == n,
            "every worker to beat after its start",
            timeout=120,
        )
        assert worker_connections(small_server) <= n

        window = 30.0
        with psycopg.connect(small_server, autocommit=True) as probe:
            before = _xacts(probe)
            t0 = time.monotonic()
            time.sleep(window)  # the measured window itself
            after = _xacts(probe)
            elapsed = time.monotonic() - t0
        # The probe's own first read is counted in ``after``.
        per_worker = (after - before - 1) / elapsed / n

        fresh = lab.sql("SELECT count(*), max(extract(epoch FROM now() - last_heartbeat)) FROM workers WHERE state = 'running'")
        connections = worker_connections(small_server)
        print(f"\n{n} idle workers --jobs 4: {connections} connections, {per_worker:.3f} xact/s per worker "
              f"over {elapsed:.1f} s, oldest heartbeat {fresh[0][1]:.1f} s")
        assert fresh[0][0] == n and fresh[0][1] < 15, fresh
        assert connections <= n
        assert per_worker <= 0.5
        # One sweeper for the whole fleet.
        sweepers = [w.name for w in fleet if SWEEP_LINE in w.log() or "now sweeps" in w.log()]
        assert len(sweepers) == 1, sweepers
        for w in fleet:
            w.signal(signal.SIGTERM)
        for w in fleet:
            code, _report = w.finish()
            assert code == 0, w.log()
    finally:
        lab.cleanup()


def test_the_rescue_leader_killed_another_worker_takes_over_and_requeues_a_dead_workers_job(lab):
    names = ["ra", "rb", "rc"]
    procs = {}
    for name in names:
        procs[name] = lab.worker(name, "--jobs", "1", "--log-level", "debug")
        procs[name].wait_log(f"worker {name} (id")
    with psycopg.connect(lab.db_url, autocommit=True) as conn:
        holder = wait_for(lambda: workers.rescue_leader(conn), "a rescue leader")
    leader = holder[1].split()[1]
    procs[leader].wait_log(SWEEP_LINE)
    # Only the leader sweeps.
    assert [n for n in names if SWEEP_LINE in procs[n].log()] == [leader]

    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 15"))
    [run_] = lab.wait_runs(1)
    busy = next(n for n in names if procs[n].pid == run_.worker_pid)
    doomed = {leader, busy}
    for name in doomed:
        procs[name].kill9()
    killed_at = lab.sql("SELECT now()")[0][0]
    survivors = [n for n in names if n not in doomed]

    rescued = wait_for(
        lambda: lab.sql("SELECT datetime FROM events WHERE job_id = %s AND event = 'rescued'", (job_id,)),
        "the dead worker's job to be rescued",
    )
    delay = (rescued[0][0] - killed_at).total_seconds()
    assert delay <= 10, f"the job of a dead worker came back {delay:.1f} s after the kill"
    with psycopg.connect(lab.db_url, autocommit=True) as conn:
        new = wait_for(lambda: workers.rescue_leader(conn), "a new rescue leader")
    new_leader = new[1].split()[1]
    assert new_leader in survivors
    # The new leader swept; the other survivor (if any) never did.
    assert [n for n in survivors if SWEEP_LINE in procs[n].log()] == [new_leader]
    lab.wait_status(job_id, "finished")
    assert lab.events(job_id) == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]
    for name in survivors:
        code, _report = procs[name].stop()
        assert code == 0
    lab.check_invariants({job_id: "finished"})


def test_a_worker_behind_a_transaction_pooler_keeps_no_session_state_and_runs_jobs(lab):
    # Through PgBouncer in transaction pooling a session lock or a LISTEN would stay on
    # whichever server connection the statement ran on: with the setting
    # (CRH_DATABASE_POOLER=transaction) the worker takes none, polls, and sweeps itself
    # (every lease, with jitter).  Directly against the server here, so that pg_locks
    # shows what the worker's own sessions hold (test_pgbouncer.py runs it through PgBouncer).
    w = lab.worker("pooled", "--jobs", "2", "--lease", "6", "--log-level", "debug",
                   env={**lab.env, "CRH_DATABASE_POOLER": "transaction"})
    wait_for(lambda: lab.sql("SELECT count(*) FROM workers WHERE name = 'pooled' AND state = 'running'")[0][0] == 1,
             "the pooled worker to register")
    ids = lab.add(*lab.tomodirs(2, cfg="sleep = 2"))
    for job_id in ids:
        lab.wait_status(job_id, "finished")
    held = lab.sql(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND starts_with(a.application_name, 'crh_worker pooled ')"
    )
    assert held == [(0,)]
    listening = lab.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, 'crh_worker pooled ') "
        "AND query ILIKE 'LISTEN%%'"
    )
    assert listening == [(0,)]
    # It sweeps by itself: a sweep line comes within a lease (6 s) and its jitter.
    w.wait_log(SWEEP_LINE, timeout=30)
    assert "now sweeps" not in w.log()  # no leader lock through a pooler
    code, report = w.stop()
    assert code == 0 and report["finished"] == 2, w.log()
    lab.check_invariants({job_id: "finished" for job_id in ids})


def test_a_worker_wedged_in_a_claim_cuts_its_control_connection_and_still_stops(lab, proxy):
    # All of an idle worker's statements go over its control connection now.  A proxy or
    # NAT that goes on acknowledging but never answers leaves a statement waiting for
    # ever (the fault run, seed 101: a worker waited in a claim for 10 minutes after
    # SIGTERM); the watchdog cuts such a connection and the loop goes on.
    from .faults import proxy_url

    env = {**lab.env, "CRH_DATABASE_URL": proxy_url(proxy, lab.db_url)}
    w = lab.worker("wedged", "--lease", "6", env=env)
    w.wait_log("now sweeps")
    proxy.freeze_after(b"crh_claim(")
    wait_for(proxy.triggered.is_set, "a claim to pass the proxy")
    w.wait_log("control connection silent")
    w.signal(signal.SIGTERM)
    try:
        code, _report = w.finish(timeout=120)
    finally:
        proxy.unfreeze()
    assert code == 0, w.log()
