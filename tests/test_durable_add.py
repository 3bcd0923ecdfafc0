"""What crh_add reports as queued is on disk: a server that crashes right after it still has it.

crh_add queues its jobs with commits that do not wait for the disk and then
makes them all durable with one commit that does (session.durable_commit).
The long fault run (seed 202) saw two jobs crh_add reported as added stay
'registering' for ever: the server was stopped with ``-m immediate`` 150 ms
after their registration, and their queueing was gone.  The durable commit
was ``SELECT txid_current()``; PostgreSQL does not wait for the disk when a
transaction wrote no WAL of its own, xid or not.

Each test has a server of its own whose WAL writer waits 10 s between rounds,
so an asynchronous commit stays in memory until something flushes it: what the
test sees is what the durable commit did, not the WAL writer's timing.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from cr_queue.queries import session
from cr_queue.tomodir import synth

from .conftest import commands_env, run, script, throwaway_server


@pytest.fixture
def slow_wal_server():
    """(cluster, url): a migrated database on a throwaway server whose WAL writer sleeps 10 s.
    fsync off is harmless here: an immediate stop loses what is in the server's memory,
    not what was written to the operating system."""
    conf = {"fsync": "off", "wal_writer_delay": "10s", "wal_writer_flush_after": "0"}
    with throwaway_server("crh-durable-pg-", conf) as server:
        yield server


def test_the_durable_commit_waits_for_every_earlier_asynchronous_commit(slow_wal_server) -> None:
    _cluster, url = slow_wal_server
    with psycopg.connect(url, autocommit=True) as conn:
        session.synchronous_commit(conn, False)
        conn.execute("CREATE TEMP TABLE scratch (x int)")  # a write of this session's own
        conn.execute("INSERT INTO scratch VALUES (1)")
        written = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        flushed = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
        assert _lsn(flushed) < _lsn(written), "the asynchronous commit was flushed already: the test shows nothing"
        session.durable_commit(conn)
        flushed = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
        assert _lsn(flushed) >= _lsn(written)


def test_jobs_crh_add_reported_are_queued_after_an_immediate_crash(slow_wal_server, tmp_path: Path) -> None:
    cluster, url = slow_wal_server
    tomodirs = synth.make_tree(tmp_path / "tree", n_inv=3, nx=8, nz=6)
    env = commands_env(url, tmp_path)
    out = run([script("crh_add"), "--json", str(tmp_path / "tree")], env)
    assert '"added"' in out.stdout
    cluster.stop(mode="immediate")  # at once: nothing else has committed since
    cluster.start()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM inversions GROUP BY 1").fetchall()
    assert rows == [("queued", len(tomodirs))]


def _lsn(text: str) -> int:
    high, low = str(text).split("/")
    return (int(high, 16) << 32) | int(low, 16)
