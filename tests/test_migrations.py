"""The alembic migrations against a real database, and their agreement with schema.py."""

from __future__ import annotations

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cr_queue.db import migrate
from cr_queue.db.schema import STATUS_CHECK, metadata


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_downgrade_base_then_upgrade_head(empty_db_url):
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()
    assert {"inversions", "binary_data", "blobs", "workers", "events"} <= _tables(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current(empty_db_url) is None
    assert _tables(empty_db_url) == {"alembic_version"}
    migrate.upgrade(empty_db_url, "head")
    assert migrate.current(empty_db_url) == migrate.head()
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(
            "INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file) "
            "VALUES ('queued', 'inv', 'u', 'h', '/p', '/p.crh')"
        )


def test_migrations_match_schema_module(db_url):
    engine = migrate._engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_alembic_command_line_works_from_checkout(empty_db_url):
    """An admin can also drive the migrations with the alembic tool itself."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dsn = psycopg.conninfo.conninfo_to_dict(empty_db_url)
    url = f"postgresql+psycopg://{dsn['user']}@/{dsn['dbname']}?host={dsn['host']}&port={dsn.get('port', 5432)}"
    for args in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(repo / "cr_queue" / "db" / "migrations" / "alembic.ini"), "-x", f"url={url}", *args],
            check=True,
            capture_output=True,
            cwd=repo,
        )
    assert migrate.current(empty_db_url) == migrate.head()


def test_upgrade_refuses_a_cr_hydra_database(empty_db_url):
    import pytest

    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE inversions (index serial, status text)")
        conn.execute("CREATE TABLE binary_data (index serial, data bytea)")
    with pytest.raises(migrate.ForeignSchema, match="cr_hydra database"):
        migrate.upgrade(empty_db_url)
    assert _tables(empty_db_url) == {"inversions", "binary_data"}


def test_head_is_alembics_head():
    """migrate.head() is written out so commands need not import alembic; it must be alembic's answer."""
    from alembic.script import ScriptDirectory

    assert migrate.head() == ScriptDirectory.from_config(migrate._config()).get_current_head()


def test_the_status_check_built_from_job_status_is_the_one_migrated(db_url):
    """schema.py builds the CHECK from JobStatus; PostgreSQL reads it as the constraint 0001 created,
    so no migration is needed (alembic's comparison does not look at CHECK constraints)."""
    with psycopg.connect(db_url) as conn:
        conn.execute(f"CREATE TEMP TABLE probe (status text, CONSTRAINT probe_status CHECK ({STATUS_CHECK}))")
        rows = conn.execute(
            "SELECT pg_get_constraintdef(oid), conname FROM pg_constraint "
            "WHERE conrelid IN ('inversions'::regclass, 'probe'::regclass) AND contype = 'c' "
            "ORDER BY conrelid = 'probe'::regclass"
        ).fetchall()
    live = [r[0] for r in rows[:-1] if "status" in r[0] and "finished_has_result" not in r[1]]
    assert live == [rows[-1][0]]


def test_upgrade_from_0004_with_jobs_in_every_state(empty_db_url):
    """A live 0004 database moves to head: every job keeps its state and history, rows that
    break the new constraints (as the attacks of issue 15 left them) are repaired, and the
    jobs go on through the database's functions."""
    from cr_queue.job_states import JobStatus
    from cr_queue.queries import jobs, workers

    migrate.upgrade(empty_db_url, "0004")
    sha_in, sha_out = "a" * 64, "b" * 64
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        for sha in (sha_in, sha_out):
            conn.execute("INSERT INTO blobs (sha256, size, n_chunks, complete) VALUES (%s, 0, 0, true)", (sha,))
        wid = workers.register_worker(
            conn, name="w", host="node", pid=1, version="t", jobs=1, threads=1, groups=[], solvers={}
        )

        def job(status, **columns):
            values = {"status": status, "sim_type": "inv", "username": "u", "source_computer": "h",
                      "source_path": f"/p/{status}/{len(columns)}", "crh_file": "/p.crh",
                      "input_sha256": None if status == "registering" else sha_in, **columns}
            names = ", ".join(values)
            marks = ", ".join(["%s"] * len(values))
            return conn.execute(f"INSERT INTO inversions ({names}) VALUES ({marks}) RETURNING id",
                                list(values.values())).fetchone()[0]

        ids = {
            "registering": job("registering"),
            "queued": job("queued", fair_rank=1),
            "running": job("running", worker_id=wid, attempt=1, tries=1),
            "finished": job("finished", result_sha256=sha_out, attempt=1, tries=1),
            "failed": job("failed", attempt=1, tries=1, failure_category="solver"),
            "cancelled": job("cancelled"),
            # what attacks 1, 2 and 4 left behind at 0004
            "forged_finish": job("finished", result_sha256=None),
            "forged_rank": job("queued", priority=2147483647, fair_rank=-9223372036854775808),
        }
        assert {s for s in JobStatus} <= {conn.execute("SELECT status FROM inversions WHERE id = %s", (i,)).fetchone()[0]
                                          for i in ids.values()}

    migrate.upgrade(empty_db_url, "head")
    assert migrate.current(empty_db_url) == migrate.head()
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, status, priority, fair_rank, failure_category FROM inversions").fetchall()}
        for state in JobStatus:
            assert rows[ids[state]][0] == state
        assert rows[ids["forged_finish"]][0] == "failed" and rows[ids["forged_finish"]][3] == "no_result"
        assert conn.execute("SELECT event FROM events WHERE job_id = %s", (ids["forged_finish"],)).fetchall() == [("repaired",)]
        assert rows[ids["forged_rank"]][1:3] == (1_000_000, 0)
        # the jobs go on, through the functions
        actor = jobs.Actor(worker_id=wid)
        running = jobs.get_job(conn, ids["running"])
        assert jobs.complete(conn, running, result_sha256=sha_out, exit_code=0, actor=actor)
        claimed = jobs.claim(conn, actor=actor, can_mod=True, can_inv=True, lease_s=30)
        assert claimed.id == ids["forged_rank"]
        assert sorted(jobs.requeue(conn, [ids["failed"], ids["cancelled"]], actor)) == sorted([ids["failed"], ids["cancelled"]])
        assert jobs.finish_registration(conn, ids["registering"], sha_in, actor)
    # and back: 0004 takes the repaired rows as they are
    migrate.downgrade(empty_db_url, "0004")
    migrate.upgrade(empty_db_url, "head")


def test_each_downgrade_brings_back_the_functions_of_the_revision_before(empty_db_url):
    # 0007's downgrade runs 0005's block for crh_release_node_failure (sql_steps: "0005_job_integrity:...")
    # instead of a copy of it: the function after head -> 0006 must be the one 0006 had.
    def functions() -> dict[str, str]:
        with psycopg.connect(empty_db_url) as conn:
            rows = conn.execute(
                "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p "
                "WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'crh%'"
            ).fetchall()
        return dict(rows)

    migrate.upgrade(empty_db_url, "0006")
    at_0006 = functions()
    assert "SET search_path" in at_0006["crh_release_node_failure(bigint,integer,bigint,text,integer,text,text,integer,jsonb)"]
    migrate.upgrade(empty_db_url, "head")
    assert functions() != at_0006
    migrate.downgrade(empty_db_url, "0006")
    assert functions() == at_0006
