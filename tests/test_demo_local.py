"""Zero setup: `crh demo` and `crh_add --local` on a private embedded database of their own."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from cr_queue.tomodir import discover
from cr_queue.tomodir import synth

from .conftest import run, script


@pytest.fixture
def embedded_env(cli_env):
    """No database configured at all: the commands must start their own."""
    home = Path(tempfile.mkdtemp(prefix="crh-test-embedded-"))
    env = {k: v for k, v in cli_env.items() if k != "CRH_DATABASE_URL"}
    env.update({"CRH_EMBEDDED_DIR": str(home / "pg"), "HOME": str(home), "XDG_DATA_HOME": str(home / "data")})
    yield env
    run([script("crh"), "db", "stop"], env, check=None)
    shutil.rmtree(home, ignore_errors=True)


def test_demo_on_the_embedded_database(embedded_env):
    env = {k: v for k, v in embedded_env.items() if k not in ("CRH_CRMOD", "CRH_CRTOMO")}
    proc = run([script("crh"), "demo"], env, timeout=300)
    assert "STAND-IN" in proc.stdout
    assert "demo OK: 6 of 6 tomodirs finished and retrieved" in proc.stdout
    assert "the demo's 6 jobs stay in the database" in proc.stdout
    assert "the embedded PostgreSQL keeps running for the next command; `crh db stop` stops it" in proc.stdout
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


def test_demo_as_an_unprivileged_user(unprivileged_user, traverse):
    """Real users are not root: the embedded database then runs as the user themselves.

    The account is ``nobody`` (or one made for this test and deleted after
    it); the directories above the interpreter and the checkout are made
    passable for this test only (conftest's ``traverse``), so the result
    does not depend on what an earlier test left."""
    import os
    import subprocess
    import sys

    import cr_queue

    runuser = shutil.which("runuser")
    if not runuser:
        pytest.skip("needs runuser to switch to an unprivileged user")
    user = unprivileged_user.pw_name
    traverse(unprivileged_user, Path(sys.executable).resolve(), Path(sys.executable).parent / "crh", Path(cr_queue.__file__))
    home = Path(tempfile.mkdtemp(prefix="crh-test-home-"))
    os.chown(home, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    bindir = Path(sys.executable).parent
    if subprocess.run([runuser, "-u", user, "--", "test", "-x", str(bindir / "crh")]).returncode != 0:
        pytest.skip(f"{bindir / 'crh'} cannot be run by an unprivileged user on this machine (a directory above it is private)")
    env = {"HOME": str(home), "PATH": f"{bindir}:/usr/bin:/bin", "NO_COLOR": "1", "LANG": "C.UTF-8"}
    try:
        proc = subprocess.run(
            [runuser, "-u", user, "--", "env", f"HOME={home}", str(bindir / "crh"), "demo"],
            env=env, cwd=home, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "demo OK: 6 of 6" in proc.stdout
        assert str(home) in subprocess.run(
            [runuser, "-u", user, "--", "env", f"HOME={home}", str(bindir / "crh"), "db", "status"],
            env=env, cwd=home, capture_output=True, text=True, timeout=60,
        ).stdout
    finally:
        subprocess.run([runuser, "-u", user, "--", "env", f"HOME={home}", str(bindir / "crh"), "db", "stop"], env=env, cwd=home, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
