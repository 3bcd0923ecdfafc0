"""cr_queue behind a real PgBouncer in transaction pooling mode (issue 16).

Every test here goes through Debian's pgbouncer (tests/pgbouncer.py, fixture
``pgbouncer``) with ``CRH_DATABASE_POOLER=transaction``.  Through it each
transaction may run on any server connection, shared with other clients:
psycopg's server-side prepared statements ("_pg3_0", ...) and session-level
SETs, LISTEN and advisory locks stay behind on a server connection that the
next client gets.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from cr_queue import config
from cr_queue.database import open_database
from cr_queue.db.connection import Database, is_pooled
from cr_queue.queries import session
from cr_queue.tomodir import discover

from .conftest import run, script
from .faults import Lab, solver_script, standin_alive, wait_for

# psycopg prepares a statement on the server once it ran this many times on one connection.
PSYCOPG_PREPARE_THRESHOLD = 5
ROUNDS = 4 * PSYCOPG_PREPARE_THRESHOLD



def _database(env: dict[str, str]) -> Database:
    """The Database a command would open with this environment (no config file but what env names)."""
    return open_database(config.load(env=env))


def _env(pgbouncer, db_url: str, tmp_path, *, pooler: str | None) -> dict[str, str]:
    empty = tmp_path / "config.toml"
    empty.write_text("")
    env = {
        "CRH_DATABASE_URL": pgbouncer.url(db_url),
        "CRH_SYSTEM_CONFIG": str(tmp_path / "no-system-config.toml"),
        "CRH_CONFIG": str(empty),
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
    }
    if pooler is not None:
        env["CRH_DATABASE_POOLER"] = pooler
    return env


def _same_statements_on_two_connections(db: Database) -> None:
    """Two clients of one pool run the query layer's statements in turn, each many more times than
    psycopg's prepare threshold: one pgbouncer server connection serves both (it hands out the
    one used last), so a statement one client prepared there is already there for the other."""
    with db.connect("crh test a") as a, db.connect("crh test b") as b:
        for _ in range(ROUNDS):
            for conn in (a, b):
                assert session.schema_revision(conn) is not None


def test_the_setting_keeps_statements_unprepared_through_pgbouncer(pgbouncer, db_url, tmp_path):
    pooled = _database(_env(pgbouncer, db_url, tmp_path, pooler="transaction"))
    assert pooled.pooled
    _same_statements_on_two_connections(pooled)  # no DuplicatePreparedStatement

    # Without the setting psycopg prepares the statements on the shared server connection, and the
    # second client's "_pg3_0" is already there: what issue 16 saw.
    direct = _database(_env(pgbouncer, db_url, tmp_path, pooler=None))
    assert not direct.pooled
    with pytest.raises(psycopg.errors.DuplicatePreparedStatement, match='prepared statement "_pg3_0" already exists'):
        _same_statements_on_two_connections(direct)


def _set_in_a_session(conn) -> set[str]:
    """The settings of session.py that a session (not the server's configuration) set on the server connection."""
    rows = conn.execute(
        "SELECT name FROM pg_settings WHERE source = 'session'"
        " AND name IN ('synchronous_commit', 'idle_in_transaction_session_timeout')"
    ).fetchall()
    return {name for (name,) in rows}


def test_pooled_connections_leave_no_session_setting_behind(pgbouncer, db_url, tmp_path):
    """The wrappers of queries/session.py send no session-level SET through the pooler: a setting
    would stay on the server connection the next client gets (the pool hands out the one used last)."""
    db = _database(_env(pgbouncer, db_url, tmp_path, pooler="transaction"))
    with db.connect("crh test") as conn, db.connect("crh test next") as other:
        assert is_pooled(conn)
        session.bound_idle_transactions(conn, 10)
        session.synchronous_commit(conn, False)
        session.durable_commit(conn)
        with conn.transaction():  # a local setting is sent, and ends with its transaction
            session.synchronous_commit(conn, True, local=True)
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert _set_in_a_session(other) == set()

    # Without the setting the same calls leave both behind for the next client.
    direct = _database(_env(pgbouncer, db_url, tmp_path, pooler=None))
    with direct.connect("crh test") as conn, direct.connect("crh test next") as other:
        session.bound_idle_transactions(conn, 10)
        session.synchronous_commit(conn, False)
        assert _set_in_a_session(other) == {"synchronous_commit", "idle_in_transaction_session_timeout"}
        session.durable_commit(conn)
        conn.execute("RESET ALL")  # not to leave them to the next test


def test_a_wrong_pooler_setting_is_one_message_and_exit_2(pooled_env, tmp_path):
    proc = run([script("crh_status")], {**pooled_env, "CRH_DATABASE_POOLER": "transactions"}, cwd=tmp_path, check=2)
    assert "CRH_DATABASE_POOLER='transactions'" in proc.stderr and "transaction" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def pooled_lab(tmp_path, pooled_env, db_url):
    """A fault test's world (tests/faults.py) whose commands all go through pgbouncer."""
    world = Lab(tmp_path, dict(pooled_env), db_url)
    yield world
    world.cleanup()


def _commits(lab: Lab) -> int:
    """Transactions committed in the test's database so far (the server's own count)."""
    return lab.sql("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")[0][0]


def test_ten_tomodirs_two_workers_and_retrieve_through_pgbouncer(pooled_lab):
    """Issue 16's case: the workers wait for work first, polling the queue far more often than
    psycopg's prepare threshold (without the setting they leave their "_pg3_0" on the pool's
    server connections and crh_add's own "_pg3_0" collides with it), then crh_add of 10
    tomodirs, the two workers solve them, crh_retrieve brings all 10 back."""
    lab = pooled_lab
    workers = [lab.worker(f"w{i}", "--jobs", "2") for i in range(2)]
    for w in workers:
        w.wait_log(f"worker {w.name} (id")
    idle_since = _commits(lab)
    wait_for(lambda: _commits(lab) >= idle_since + 8 * PSYCOPG_PREPARE_THRESHOLD, "the idle workers to poll a while")

    tomodirs = lab.tomodirs(10, cfg="sleep = 0.5")
    ids = lab.add()
    assert len(ids) == 10
    wait_for(lambda: lab.sql("SELECT count(*) FROM inversions WHERE status = 'finished'") == [(10,)], "all 10 jobs finished", 120)
    results = [w.stop() for w in workers]
    assert [code for code, _ in results] == [0, 0], [w.log() for w in workers]
    assert sum(report["finished"] for _, report in results) == 10

    report = json.loads(run([script("crh_retrieve"), "--json"], lab.env, cwd=lab.tree).stdout)
    assert len(report["retrieved"]) == 10 and not report["failed"] and not report["pending"]
    for td in tomodirs:
        assert discover.classify(td) == discover.Done(td)
        assert (td / "mod" / "volt.dat").exists()
    assert lab.sql("SELECT status, downloaded, count(*) FROM inversions GROUP BY 1, 2") == [("finished", True, 10)]
    assert len(lab.runs()) == 10
    lab.check_invariants({i: "finished" for i in ids})


def test_a_worker_killed_mid_job_behind_pgbouncer_loses_nothing_by_its_lease(pooled_lab):
    """No advisory lock tells the survivor that the worker died: its lease runs out (short here,
    --lease 3), the sweep puts the job back, and the other worker finishes it, once."""
    lab = pooled_lab
    [job_id] = lab.add(*lab.tomodirs(1, cfg="fail = none"))  # no sleep here: CRH_STANDIN_SLEEP decides
    # a's solver runs two minutes: the kill lands while it runs, however slow b is to start.
    slow = solver_script(lab.tmp_path / "slow" / "CRMod", f'CRH_STANDIN_SLEEP=120 exec "{script("crh_standin_crmod")}"')
    a = lab.worker("a", "--lease", "3", env={**lab.env, "CRH_CRMOD": str(slow)})
    [first] = lab.wait_runs(1)
    assert first.worker_pid == a.pid
    b = lab.worker("b", "--lease", "3")
    b.wait_log("worker b (id")

    assert standin_alive(first.pid), "a's solver still runs when a is killed"
    a.kill9()

    wait_for(lambda: not standin_alive(first.pid), "the killed worker's solver to die with it")
    job = lab.wait_status(job_id, "finished", timeout=120)
    assert job["attempt"] == 2
    assert lab.events(job_id).count("finished") == 1
    runs = lab.runs()
    assert len(runs) == 2 and runs[1].worker_pid == b.pid and runs[1].job_id == job_id
    code, report = b.stop()
    assert code == 0 and report["finished"] == 1
    lab.check_invariants({job_id: "finished"})


def test_crh_add_holds_its_directory_only_while_it_runs_through_pgbouncer(pooled_lab):
    """crh_add's directory lock (directory_locks.py) through the pooler: a second run is refused
    while the first runs, and once that ended a third one adds what is left.  Before, the first
    run's session lock stayed on a pooled server connection after it ended, and every later
    crh_add on the tree was refused ("another crh_add is registering ...") until pgbouncer
    closed that server connection."""
    lab = pooled_lab
    tds = lab.tomodirs(3, cfg="sleep = 0")
    first = lab.run_until_paused([script("crh_add"), "--json", str(lab.tree)], "add:registered")

    second = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert second["added"] == []
    for item in second["skipped"]:
        assert f"another crh_add (pid {first.pid} on " in item["reason"], item["reason"]
    first.kill()
    first.wait()

    third = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(Path(a["path"]) for a in third["added"]) == tds
    more = lab.tomodirs(2, cfg="sleep = 0")
    fourth = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(Path(a["path"]) for a in fourth["added"]) == more, fourth["skipped"]
    assert dict(lab.sql("SELECT source_path, count(*) FROM inversions GROUP BY 1")) == {str(td): 1 for td in tds + more}
    assert lab.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)], "no lock outlives its run"
