"""The commands' schema check: a schema newer than the program (issue 14 defect 11), and a
check that leaves no ERROR in the server's log (issue 19 item 5)."""

from __future__ import annotations

import uuid

import psycopg

from cr_queue.db import migrate
from cr_queue.tomodir import synth

from .conftest import commands_env, run, script
from .faults import wait_for

NEWER = "0099"


def test_a_schema_newer_than_the_program_says_upgrade_cr_queue_here(db_url, tmp_path):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (NEWER,))
    env = commands_env(db_url, tmp_path)
    synth.make_tomodir(tmp_path / "tree" / "td", "mod", seed=1)
    expected = f"the database schema is {NEWER}, newer than this cr_queue ({migrate.head()}): upgrade cr_queue here"
    for args in ([script("crh_status")], [script("crh_add"), str(tmp_path / "tree")], [script("crh"), "db", "upgrade"]):
        done = run(args, env, check=2)
        assert expected in done.stderr, (args, done.stderr)
        assert "crh db upgrade" not in done.stderr and "Traceback" not in done.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(NEWER,)], "left as it was"


def _server_log(pg_cluster) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((pg_cluster.datadir / "log").glob("postgresql-*.log")))


def test_the_schema_check_leaves_no_error_in_the_server_log(empty_db_url, pg_cluster, tmp_path):
    before = len(_server_log(pg_cluster))
    done = run([script("crh_status")], commands_env(empty_db_url, tmp_path), check=2)
    assert "crh db upgrade" in done.stderr
    # An error of our own with a unique mark: once it is in the log, so is all before it.
    mark = f"crh_test_mark_{uuid.uuid4().hex}"
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        try:
            conn.execute(f"SELECT * FROM {mark}")
        except psycopg.errors.UndefinedTable:
            pass
    wait_for(lambda: mark in _server_log(pg_cluster)[before:], "the test's own error in the server log")
    logged = _server_log(pg_cluster)[before:]
    assert 'relation "alembic_version" does not exist' not in logged, logged
