"""crh_retrieve and a finished job without a result: an error, never "0 files", and the .crh stays.

Since migration 0005 the database refuses such a job (ck_inversions_finished_has_result);
this test makes one the only way left, as the owner after dropping the constraint, as a
database damaged by hand or restored from before 0005 would have it.
"""

from __future__ import annotations

import json

import psycopg

from cr_queue.tomodir import synth

from .conftest import run, script


def test_a_finished_job_without_result_is_an_error_and_keeps_the_crh(tmp_path, cli_env, db_url):
    tree = tmp_path / "tree"
    tomodir = synth.make_tree(tree, n_inv=1)[0]
    job_id = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tree).stdout)["added"][0]["job_id"]
    before = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    with psycopg.connect(db_url, autocommit=True) as owner:
        owner.execute("ALTER TABLE inversions DROP CONSTRAINT ck_inversions_finished_has_result")
        owner.execute("UPDATE inversions SET status = 'finished', result_sha256 = NULL WHERE id = %s", (job_id,))
    proc = run([script("crh_retrieve")], cli_env, cwd=tree, check=1)
    assert f"job {job_id} is marked finished but" in proc.stderr + proc.stdout
    assert "0 files" not in proc.stdout
    assert tomodir.with_suffix(".crh").exists()
    assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == before
    with psycopg.connect(db_url) as owner:
        assert owner.execute("SELECT downloaded FROM inversions WHERE id = %s", (job_id,)).fetchone()[0] is False
