"""Bad input gets a message naming the thing, the problem and the remedy, and loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from cr_queue.tomodir import synth

from .conftest import run, script


def _tree_state(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_unreachable_database_names_url_without_password(tmp_path, cli_env):
    synth.make_tree(tmp_path, n_mod=1)
    env = {**cli_env, "CRH_DATABASE_URL": "postgresql://alice:s3cret@127.0.0.1:1/crq?connect_timeout=2"}
    before = _tree_state(tmp_path)
    proc = run([script("crh_add")], env, cwd=tmp_path, check=2)
    assert "s3cret" not in proc.stderr + proc.stdout
    assert "postgresql://alice:***@127.0.0.1:1/crq" in proc.stderr
    assert "CRH_DATABASE_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert _tree_state(tmp_path) == before
    proc = run([script("crh_retrieve")], env, cwd=tmp_path, check=2)
    assert "s3cret" not in proc.stderr


def test_missing_solver_binary_refuses_to_start(tmp_path, cli_env):
    proc = run([script("crh_worker"), "-q", "--crtomo", str(tmp_path / "nope" / "CRTomo")], cli_env, check=2)
    assert str(tmp_path / "nope" / "CRTomo") in proc.stderr and "--crtomo" in proc.stderr
    not_exec = tmp_path / "CRMod"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(stat.S_IRUSR | stat.S_IWUSR)
    proc = run([script("crh_worker"), "-q", "--crmod", str(not_exec)], cli_env, check=2)
    assert "not an executable" in proc.stderr and "chmod +x" in proc.stderr
    env = {k: v for k, v in cli_env.items() if k not in ("CRH_CRMOD", "CRH_CRTOMO")}
    env["PATH"] = str(tmp_path)
    proc = run([script("crh_worker"), "-q"], env, check=2)
    assert "no solver found" in proc.stderr


def test_path_that_is_not_a_directory(tmp_path, cli_env):
    proc = run([script("crh_add"), str(tmp_path / "missing")], cli_env, check=2)
    assert "missing: no such directory" in proc.stderr
    (tmp_path / "file.txt").write_text("x")
    proc = run([script("crh_add"), str(tmp_path / "file.txt")], cli_env, check=2)
    assert "not a directory" in proc.stderr


def test_incomplete_tomodir_is_reported_and_others_still_added(tmp_path, cli_env):
    synth.make_tree(tmp_path / "ok", n_inv=2)
    broken = synth.make_tomodir(tmp_path / "broken" / "td", "mod")
    (broken / "rho" / "rho.dat").unlink()
    before = _tree_state(tmp_path)
    proc = run([script("crh_add"), "--json"], cli_env, cwd=tmp_path, check=1)
    report = json.loads(proc.stdout)
    assert len(report["added"]) == 2
    assert any("rho/rho.dat" in p and str(broken) in p for p in report["problems"])
    after = _tree_state(tmp_path)
    assert {k: after[k] for k in before} == before


def test_dry_run_changes_nothing(tmp_path, cli_env):
    synth.make_tree(tmp_path, n_mod=2, n_both=1)
    before = _tree_state(tmp_path)
    proc = run([script("crh_add"), "--dry-run", "--json"], cli_env, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert len(report["added"]) == 3 and all(a["job_id"] is None for a in report["added"])
    assert _tree_state(tmp_path) == before
    assert not list(tmp_path.rglob("*.crh"))


def test_second_add_skips_registered_and_force_reregisters(tmp_path, cli_env):
    synth.make_tree(tmp_path, n_inv=2)
    run([script("crh_add")], cli_env, cwd=tmp_path)
    proc = run([script("crh_add"), "--json"], cli_env, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert report["added"] == [] and len(report["skipped"]) == 2
    assert all("already registered as job" in s["reason"] for s in report["skipped"])
    # --force with the same content still waiting is a duplicate; once run, it registers again.
    proc = run([script("crh_add"), "--json", "--force"], cli_env, cwd=tmp_path)
    assert all("already queued or running" in s["reason"] for s in json.loads(proc.stdout)["skipped"])
    run([script("crh_worker"), "-q"], cli_env)
    proc = run([script("crh_add"), "--json", "--force"], cli_env, cwd=tmp_path)
    assert len(json.loads(proc.stdout)["added"]) == 2


def test_invalid_control_file(tmp_path, cli_env):
    td = synth.make_tomodir(tmp_path / "td", "inv")
    crh = td.with_suffix(".crh")
    crh.write_text("{not json")
    proc = run([script("crh_retrieve")], cli_env, cwd=tmp_path, check=1)
    assert crh.name in proc.stderr and "JSON" in proc.stderr
    assert crh.read_text() == "{not json"
    proc = run([script("crh_add")], cli_env, cwd=tmp_path, check=1)
    assert crh.name in proc.stderr


def test_job_id_unknown_to_the_database(tmp_path, cli_env):
    td = synth.make_tree(tmp_path, n_inv=1)[0]
    run([script("crh_add")], cli_env, cwd=tmp_path)
    crh = td.with_suffix(".crh")
    data = json.loads(crh.read_text())
    data["job_id"] = 999999
    crh.write_text(json.dumps(data))
    proc = run([script("crh_retrieve")], cli_env, cwd=tmp_path, check=1)
    assert "job 999999 is not in the database" in proc.stderr
    assert crh.exists()


def test_retrieve_reports_pending_jobs_and_keeps_their_control_files(tmp_path, cli_env):
    tomodirs = synth.make_tree(tmp_path, n_inv=2)
    run([script("crh_add")], cli_env, cwd=tmp_path)
    proc = run([script("crh_retrieve"), "--json"], cli_env, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert len(report["pending"]) == 2 and all(p["status"] == "queued" for p in report["pending"])
    assert all(td.with_suffix(".crh").exists() for td in tomodirs)


def test_user_changed_file_is_not_overwritten(tmp_path, cli_env):
    td = synth.make_tree(tmp_path, n_inv=1)[0]
    run([script("crh_add")], cli_env, cwd=tmp_path)
    # The user starts looking at results of their own meanwhile.
    mine = td / "inv" / "inv.ctr"
    mine.write_text("my own notes\n")
    run([script("crh_worker"), "-q"], cli_env)
    proc = run([script("crh_retrieve")], cli_env, cwd=tmp_path)
    assert mine.read_text() == "my own notes\n"
    beside = td / "inv" / "inv.ctr.crh-result"
    assert beside.read_text().splitlines()[-1].startswith("***finished***")
    assert "inv.ctr.crh-result" in proc.stderr


def test_no_traceback_on_bad_option(cli_env):
    proc = run([script("crh_add"), "--threads", "0"], cli_env, check=2)
    assert "Traceback" not in proc.stderr and "--threads" in proc.stderr
    assert os.path.basename(script("crh_add")) in proc.stderr
