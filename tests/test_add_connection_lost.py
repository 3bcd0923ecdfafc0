"""crh_add whose database connection dies midway: a clear message, and a rerun finishes the job."""

from __future__ import annotations

import subprocess
import time

import psycopg

from cr_queue.tomodir import synth

from .conftest import run, script


def test_add_connection_killed_midway_then_rerun(tmp_path, cli_env, db_url):
    tomodirs = synth.make_tree(tmp_path, n_inv=40, nx=60, nz=30)
    proc = subprocess.Popen([script("crh_add")], cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with psycopg.connect(db_url, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = conn.execute("SELECT count(*) FROM inversions").fetchone()[0]
            if n >= 3 or proc.poll() is not None:
                break
            time.sleep(0.02)
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'crh_add'")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, "crh_add finished before the test could cut its connection"
        assert proc.returncode == 2, err
        assert "lost the connection to the database" in err and "Traceback" not in err
        run([script("crh_add")], cli_env, cwd=tmp_path)
        rows = conn.execute("SELECT status, count(*) FROM inversions GROUP BY 1").fetchall()
        assert rows == [("queued", len(tomodirs))]
        per_dir = conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM inversions GROUP BY source_path) c").fetchone()[0]
        assert per_dir == 1
