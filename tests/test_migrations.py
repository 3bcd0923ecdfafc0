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
