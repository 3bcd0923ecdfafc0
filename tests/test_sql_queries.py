"""Every admin query in sql/ runs with psql against a populated database."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from cr_queue.tomodir import synth

from .conftest import REPO, run, script

QUERIES = sorted((REPO / "sql").glob("*.sql"))


@pytest.fixture
def populated(tmp_path, cli_env, db_url) -> str:
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_mod=2, n_inv=2)
    bad = synth.make_tomodir(tree / "bad", "mod")
    (bad / "exe" / "standin.cfg").write_text("fail = exit\n")
    run([script("crh_add")], cli_env, cwd=tree)
    run([script("crh_worker"), "-q"], cli_env)
    synth.make_tree(tmp_path / "later", n_inv=1)
    run([script("crh_add")], cli_env, cwd=tmp_path / "later")
    return db_url


def test_there_are_queries():
    assert len(QUERIES) >= 8


@pytest.mark.parametrize("query", QUERIES, ids=lambda p: p.name)
def test_query_runs(query: Path, populated: str):
    first_line = query.read_text().splitlines()[0]
    assert first_line.startswith("--"), f"{query.name} must start with a comment saying what it answers"
    proc = subprocess.run(
        ["psql", populated, "-X", "-v", "ON_ERROR_STOP=1", "-v", f"host={socket.gethostname()}", "-v", "job=1", "-f", str(query)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "row" in proc.stdout


def test_classic_finished_query_counts_this_host(populated: str):
    proc = subprocess.run(
        ["psql", populated, "-X", "-At", "-v", f"host={socket.gethostname()}", "-f", str(REPO / "sql" / "finished_last_hour.sql")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "4"
