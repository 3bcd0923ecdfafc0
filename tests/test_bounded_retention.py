"""A database that stays bounded: crh_cleanup purges the archives of retrieved jobs, keeps their rows and events,
and what --dry-run shows is what it deletes (one definition of an archive nobody needs)."""

from __future__ import annotations

import hashlib
import json
import os

import psycopg

from cr_queue import cleanup, store
from cr_queue.tomodir import synth

from .conftest import run, script, sql_rows


def _blob_ids(db_url) -> set[int]:
    return {r[0] for r in sql_rows(db_url, "SELECT id FROM blobs")}


def _pipeline(tmp_path, cli_env, n=5):
    """crh_add → crh_worker → crh_retrieve of n tomodirs, with the real commands; returns the job ids."""
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_mod=n - 2, n_inv=2)
    added = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tree).stdout)["added"]
    run([script("crh_worker"), "-q", "--jobs", "2"], cli_env)
    run([script("crh_retrieve")], cli_env, cwd=tree)
    ids = sorted(a["job_id"] for a in added)
    assert len(ids) == n
    return tree, ids


def test_keep_retrieved_0_purges_every_archive_and_keeps_jobs_and_events(tmp_path, cli_env, db_url):
    """Acceptance: add → worker → retrieve of 5 tomodirs, then `crh_cleanup --keep-retrieved 0 --yes`."""
    _tree, ids = _pipeline(tmp_path, cli_env)
    assert sql_rows(db_url, "SELECT count(*) FROM inversions WHERE downloaded AND status = 'finished'")[0][0] == 5
    events_before = sql_rows(db_url, "SELECT job_id, id, event FROM events ORDER BY id")
    archives = dict(sql_rows(db_url, "SELECT id, input_sha256 || ' ' || result_sha256 FROM inversions"))
    assert sql_rows(db_url, "SELECT count(*) FROM blobs")[0][0] >= 10

    dry = json.loads(run([script("crh_cleanup"), "--keep-retrieved", "0", "--dry-run", "--json"], cli_env).stdout)
    assert sorted(j["id"] for j in dry["plan"]["purge"]) == ids
    planned = sorted(b["id"] for b in dry["plan"]["blobs"])
    assert set(planned) == _blob_ids(db_url)

    proc = run([script("crh_cleanup"), "--keep-retrieved", "0", "--yes"], cli_env)
    assert "purged the archives of 5 retrieved jobs" in proc.stdout
    assert "freed" in proc.stdout and "binary_data on disk:" in proc.stdout
    assert sql_rows(db_url, "SELECT count(*) FROM blobs")[0][0] == 0
    assert sql_rows(db_url, "SELECT count(*) FROM binary_data")[0][0] == 0
    # The five jobs stay, finished and retrieved, with every event they had and one 'purged' event each.
    rows = sql_rows(db_url, "SELECT id, status, downloaded, datetime_purged IS NOT NULL FROM inversions ORDER BY id")
    assert rows == [(i, "finished", True, True) for i in ids]
    events_after = sql_rows(db_url, "SELECT job_id, id, event FROM events ORDER BY id")
    assert events_after[: len(events_before)] == events_before
    purged = sql_rows(db_url, "SELECT job_id, detail FROM events WHERE event = 'purged' ORDER BY job_id")
    assert [job_id for job_id, _ in purged] == ids
    for job_id, detail in purged:
        assert f"{detail['input_sha256']} {detail['result_sha256']}" == archives[job_id]

    report = json.loads(run([script("crh_cleanup"), "--keep-retrieved", "0", "--dry-run", "--json"], cli_env).stdout)
    assert report["plan"]["purge"] == [] and report["plan"]["blobs"] == []
    shown = run([script("crh"), "show", str(ids[0])], cli_env).stdout
    assert "input and result archives purged" in shown and "purged" in shown


def test_the_space_freed_is_reported_in_json(tmp_path, cli_env, db_url):
    _pipeline(tmp_path, cli_env, n=3)
    sizes = sum(r[0] for r in sql_rows(db_url, "SELECT size FROM blobs"))
    report = json.loads(run([script("crh_cleanup"), "--keep-retrieved", "0", "--yes", "--json"], cli_env).stdout)
    assert report["result"]["bytes_freed"] == sizes > 0
    assert len(report["result"]["purged_jobs"]) == 3
    assert set(report["result"]["store_size_before"]) == {"binary_data", "blobs", "inversions", "events"}


def test_recently_retrieved_jobs_keep_their_archives(tmp_path, cli_env, db_url):
    _tree, ids = _pipeline(tmp_path, cli_env, n=3)
    # One of them was retrieved 31 days ago: only its archives go with the default (30 days) ...
    sql_rows(db_url, "UPDATE inversions SET datetime_downloaded = now() - interval '31 days' WHERE id = %s", (ids[0],))
    report = json.loads(run([script("crh_cleanup"), "--yes", "--json"], cli_env).stdout)
    assert report["result"]["purged_jobs"] == [ids[0]]
    left = sql_rows(db_url, "SELECT id FROM inversions WHERE input_sha256 IS NOT NULL ORDER BY id")
    assert [r[0] for r in left] == ids[1:]
    # ... and [cleanup] keep_retrieved in the config sets the default.
    config = tmp_path / "config.toml"
    config.write_text('[cleanup]\nkeep_retrieved = "1s"\n')
    sql_rows(db_url, "UPDATE inversions SET datetime_downloaded = now() - interval '1 minute'")
    report = json.loads(run([script("crh_cleanup"), "--yes", "--json"], {**cli_env, "CRH_CONFIG": str(config)}).stdout)
    assert report["result"]["purged_jobs"] == ids[1:]
    assert sql_rows(db_url, "SELECT count(*) FROM blobs")[0][0] == 0


def test_a_bad_keep_retrieved_is_refused(cli_env, tmp_path):
    proc = run([script("crh_cleanup"), "--keep-retrieved", "soon", "--dry-run"], cli_env, check=2)
    assert "'soon' is not a duration" in proc.stderr
    config = tmp_path / "config.toml"
    config.write_text('[cleanup]\nkeep_retrieved = "a month"\n')
    proc = run([script("crh_cleanup"), "--dry-run"], {**cli_env, "CRH_CONFIG": str(config)}, check=2)
    assert "[cleanup] keep_retrieved = 'a month' is not a duration" in proc.stderr


def test_an_archive_shared_with_a_job_not_purged_stays(tmp_path, cli_env, db_url):
    _tree, ids = _pipeline(tmp_path, cli_env, n=3)
    # A job running again (not retrieved) uses the same input (content addressed).
    sql_rows(db_url, "UPDATE inversions SET status = 'running', downloaded = false, datetime_downloaded = NULL WHERE id = %s",
         (ids[1],))
    sql_rows(db_url, "UPDATE inversions SET input_sha256 = (SELECT input_sha256 FROM inversions WHERE id = %s) WHERE id = %s",
         (ids[0], ids[1]))
    shared = sql_rows(db_url, "SELECT input_sha256 FROM inversions WHERE id = %s", (ids[0],))[0][0]
    run([script("crh_cleanup"), "--keep-retrieved", "0", "--yes"], cli_env)
    assert sql_rows(db_url, "SELECT count(*) FROM blobs WHERE sha256 = %s", (shared,))[0][0] == 1
    assert sql_rows(db_url, "SELECT input_sha256 FROM inversions WHERE id = %s", (ids[1],))[0][0] == shared


# ---------------------------------------------------------------- defect 12: what is shown is what is deleted


def _blob(db_url, payload: bytes) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        writer = store.Upload(conn, store.DATABASE, chunk_size=16)
        writer.write(payload)
        return writer.seal(hashlib.sha256(payload).hexdigest(), len(payload))


def _age(db_url, sha=None, hours=2):
    sql_rows(
        db_url,
        "UPDATE blobs SET datetime_created = datetime_created - make_interval(hours => %(h)s), "
        "datetime_completed = datetime_completed - make_interval(hours => %(h)s) "
        "WHERE %(sha)s::text IS NULL OR sha256 = %(sha)s",
        {"h": hours, "sha": sha},
    )


def test_dry_run_shows_exactly_what_is_deleted(tmp_path, cli_env, db_url):
    """Jobs deleted in a run take their (young) archives with them; old orphans go; young orphans are held
    back by the grace, which --dry-run shows; and the ids --dry-run lists are the ids deleted."""
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_mod=4)
    added = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tree).stdout)["added"]
    gone = added[:2]
    for a in gone:  # their .crh files removed by hand: nobody can retrieve them any more
        os.unlink(a["path"] + ".crh")
    old_orphan = _blob(db_url, b"an orphan from last week")
    _age(db_url, old_orphan)
    young_orphan = _blob(db_url, b"sealed a moment ago; its job is being registered")

    dry = json.loads(run([script("crh_cleanup"), "--dry-run", "--json"], cli_env).stdout)["plan"]
    text = run([script("crh_cleanup"), "--dry-run"], cli_env).stdout
    planned = {b["id"] for b in dry["blobs"]}
    shas = {b["sha256"] for b in dry["blobs"]}
    gone_inputs = {r[0] for r in sql_rows(db_url, "SELECT input_sha256 FROM inversions WHERE id = ANY(%s)",
                                      ([a["job_id"] for a in gone],))}
    assert gone_inputs | {old_orphan} == shas
    assert [b["sha256"] for b in dry["held_back"]] == [young_orphan]
    assert "grace: an archive no job refers to is kept until 1 h 00 min after its upload" in text and "held back now: 1 archive" in text

    before = _blob_ids(db_url)
    result = json.loads(run([script("crh_cleanup"), "--yes", "--json"], cli_env).stdout)["result"]
    assert set(result["deleted_blobs"]) == planned == before - _blob_ids(db_url)
    assert result["kept_blobs"] == []


def test_apply_deletes_only_the_planned_archives(tmp_path, cli_env, db_url):
    """An archive that became garbage after the plan is not deleted by it (the next run shows it first)."""
    old_orphan = _blob(db_url, b"planned")
    _age(db_url, old_orphan)
    with psycopg.connect(db_url, autocommit=True) as conn:
        planned = cleanup.plan(conn, cleanup.CleanupOptions())
        late = _blob(db_url, b"orphaned after the plan was shown")
        _age(db_url, late)
        result = cleanup.apply(conn, planned, store.DATABASE)
    assert [b["sha256"] for b in planned.blobs] == [old_orphan]
    remaining = {r[0] for r in sql_rows(db_url, "SELECT sha256 FROM blobs")}
    assert remaining == {late}
    assert len(result.deleted_blobs) == 1


def test_archives_of_cancelled_jobs_deleted_in_a_run_go_in_the_same_run(tmp_path, cli_env, db_url):
    """Issue 19: deleting cancelled jobs freed "0 archives" (an undocumented grace held them), and the next dry run
    said "nothing to clean up" while their orphans existed."""
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_mod=3)
    run([script("crh_add")], cli_env, cwd=tree)
    run([script("crh_cancel"), str(tree)], cli_env)
    sql_rows(db_url, "UPDATE inversions SET datetime_finished = now() - interval '2 days'")
    inputs = {r[0] for r in sql_rows(db_url, "SELECT input_sha256 FROM inversions")}
    assert len(inputs) == 3 and sql_rows(db_url, "SELECT count(*) FROM inversions WHERE status = 'cancelled'")[0][0] == 3
    report = json.loads(run([script("crh_cleanup"), "--retention", "1", "--yes", "--json"], cli_env).stdout)
    assert len(report["result"]["deleted_jobs"]) == 3
    assert {b["sha256"] for b in report["plan"]["blobs"]} == inputs
    assert len(report["result"]["deleted_blobs"]) == 3 and report["result"]["bytes_freed"] > 0
    assert sql_rows(db_url, "SELECT count(*) FROM blobs")[0][0] == 0
    again = run([script("crh_cleanup"), "--retention", "1", "--dry-run"], cli_env)
    assert "nothing to clean up" in again.stdout
