"""Zero setup: `crh demo` and `crh_add --local` on a private embedded database of their own."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from cr_queue import discover, synth

from .conftest import run, script


@pytest.fixture
def embedded_env(cli_env):
    """No database configured at all: the commands must start their own."""
    home = Path(tempfile.mkdtemp(prefix="crh-test-embedded-"))
    env = {k: v for k, v in cli_env.items() if k != "CRH_DATABASE_URL"}
    env.update({"CRH_EMBEDDED_DIR": str(home / "pg"), "HOME": str(home), "XDG_DATA_HOME": str(home / "data")})
    yield env
    run([script("crh"), "db", "stop"], env, check=None)


def test_demo_on_the_embedded_database(embedded_env):
    env = {k: v for k, v in embedded_env.items() if k not in ("CRH_CRMOD", "CRH_CRTOMO")}
    proc = run([script("crh"), "demo"], env, timeout=300)
    assert "STAND-IN" in proc.stdout
    assert "demo OK: 6 of 6 tomodirs finished and retrieved" in proc.stdout
    status = json.loads(run([script("crh"), "db", "status", "--json"], env).stdout)
    assert status["running"] is True and status["source"] == "embedded"
    run([script("crh"), "db", "stop"], env)
    status = json.loads(run([script("crh"), "db", "status", "--json"], env).stdout)
    assert status["running"] is False


def test_add_local_runs_and_retrieves(tmp_path, embedded_env):
    tomodirs = synth.make_tree(tmp_path, n_mod=1, n_inv=1, n_both=1)
    proc = run([script("crh_add"), "--local", "--local-jobs", "2"], embedded_env, cwd=tmp_path, timeout=300)
    assert "local run: 3 retrieved, 0 failed" in proc.stdout
    for td in tomodirs:
        assert discover.classify(td) == discover.Done(td)
        assert not td.with_suffix(".crh").exists()
