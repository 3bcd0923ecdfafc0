"""crh_cleanup against real PostgreSQL and the real console scripts.

Each kind of garbage is made the way it happens (an add that died, a .crh
deleted by hand, results nobody fetched), then cleanup is run as a user
would: --dry-run first, then --yes, or answering on a terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import shutil
import socket
import subprocess
import sys

import psycopg
import pytest

from psycopg import conninfo

from cr_queue import cleanup
from cr_queue.queries import jobs
from cr_queue.queries import roles
from cr_queue import store
from cr_queue.tomodir import synth

from .conftest import run, script, sql_rows

HOST = socket.gethostname()


def crh_cleanup() -> list[str]:
    """The crh_cleanup console script, or its entry point where the script is not installed yet."""
    found = shutil.which("crh_cleanup")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'crh_cleanup'; from cr_queue.cli.cleanup import main; main()"]


def _added(tmp_path, cli_env, n=4, seed=0) -> dict[str, int]:
    """Add n tomodirs with the real crh_add; returns {tomodir: job id}."""
    tree = tmp_path / f"tree{seed}"
    synth.make_tree(tree, n_mod=n, seed=seed)
    report = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tree).stdout)
    return {a["path"]: a["job_id"] for a in report["added"]}


def _ids(db_url) -> set[int]:
    return {r[0] for r in sql_rows(db_url, "SELECT id FROM inversions")}


def _blob_ids(db_url) -> set[int]:
    return {r[0] for r in sql_rows(db_url, "SELECT id FROM blobs")}


def _age_blobs(db_url, hours=2):
    sql_rows(
        db_url,
        "UPDATE blobs SET datetime_created = datetime_created - make_interval(hours => %(h)s), "
        "datetime_completed = datetime_completed - make_interval(hours => %(h)s)",
        {"h": hours},
    )


def _finish(db_url, job_id, days_ago=0.0, downloaded=False, result_sha=None):
    sql_rows(
        db_url,
        "UPDATE inversions SET status = 'finished', attempt = 1, tries = 1, exit_code = 0, "
        "result_sha256 = coalesce(%(r)s, result_sha256, input_sha256), downloaded = %(d)s, "
        "datetime_downloaded = CASE WHEN %(d)s THEN now() END, "
        "datetime_started = now() - (%(days)s * interval '1 day') - interval '5 min', "
        "datetime_finished = now() - (%(days)s * interval '1 day') WHERE id = %(id)s",
        {"id": job_id, "days": days_ago, "d": downloaded, "r": result_sha},
    )


def _blob(db_url, payload: bytes) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        writer = store.Upload(conn, store.DATABASE, chunk_size=16)
        writer.write(payload)
        return writer.seal(hashlib.sha256(payload).hexdigest(), len(payload))


def _partial_upload(conn, payload: bytes) -> int:
    """What an upload interrupted mid-stream leaves: a blob row without hash, some chunks."""
    blob_id = conn.execute("INSERT INTO blobs DEFAULT VALUES RETURNING id").fetchone()[0]
    for no in range(2):
        conn.execute("INSERT INTO binary_data (blob_id, chunk_no, data) VALUES (%s, %s, %s)", (blob_id, no, payload))
    return blob_id


@pytest.fixture
def garbage(tmp_path, cli_env, db_url):
    """One of each kind, plus what must survive; returns the ids by role."""
    added = _added(tmp_path, cli_env, n=9)
    ids = sorted(added.values())
    (
        expired,
        expiring_soon,
        crh_gone_finished,
        crh_gone_queued,
        crh_gone_running,
        retrieved_no_crh,
        other_host_no_crh,
        shares_blob,
        fresh,
    ) = ids
    paths = {v: k for k, v in added.items()}

    def crh(job_id):
        return paths[job_id] + ".crh"

    result_sha = _blob(db_url, b"a result archive")
    _finish(db_url, expired, days_ago=40, result_sha=result_sha)
    _finish(db_url, expiring_soon, days_ago=27)
    _finish(db_url, crh_gone_finished)
    _finish(db_url, retrieved_no_crh, downloaded=True)
    sql_rows(db_url, "UPDATE inversions SET status = 'running', attempt = 1, tries = 1 WHERE id = %s", (crh_gone_running,))
    sql_rows(db_url, "UPDATE inversions SET source_computer = 'elsewhere' WHERE id = %s", (other_host_no_crh,))
    # Two jobs on one archive (content addressed): deleting one must keep the archive for the other.
    sql_rows(
        db_url,
        "UPDATE inversions SET input_sha256 = (SELECT input_sha256 FROM inversions WHERE id = %s) WHERE id = %s",
        (crh_gone_finished, shares_blob),
    )
    saved = {}
    for job_id in (crh_gone_finished, crh_gone_queued, crh_gone_running, retrieved_no_crh, other_host_no_crh):
        with open(crh(job_id), "rb") as fh:
            saved[job_id] = fh.read()
        os.unlink(crh(job_id))
    # A stuck registration with its interrupted upload, as a killed crh_add leaves them.
    actor = jobs.Actor()
    with psycopg.connect(db_url, autocommit=True) as conn:
        stuck = jobs.begin_registration(
            conn,
            jobs.NewJob(sim_type="mod", model_first=False, source_path=str(tmp_path / "dead"),
                         crh_file=str(tmp_path / "dead.crh"), username=actor.os_user, source_computer=HOST),
            actor,
        )
        partial = _partial_upload(conn, b"half an upload" * 3)
        conn.execute("UPDATE inversions SET datetime_init = now() - interval '2 hours' WHERE id = %s", (stuck,))
    orphan_sha = _blob(db_url, b"nobody refers to me")
    _age_blobs(db_url)
    return {
        "expired": expired,
        "expiring_soon": expiring_soon,
        "crh_gone_finished": crh_gone_finished,
        "crh_gone_queued": crh_gone_queued,
        "crh_gone_running": crh_gone_running,
        "retrieved_no_crh": retrieved_no_crh,
        "other_host_no_crh": other_host_no_crh,
        "shares_blob": shares_blob,
        "fresh": fresh,
        "stuck": stuck,
        "partial_blob": partial,
        "orphan_sha": orphan_sha,
        "result_sha": result_sha,
        "paths": paths,
        "crh_bytes": saved,
    }


def test_dry_run_reports_every_kind_and_deletes_nothing(garbage, cli_env, db_url):
    before_jobs, before_blobs = _ids(db_url), _blob_ids(db_url)
    proc = run([script("crh"), "cleanup", "--dry-run", "--json"], cli_env)
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True and report["applied"] is False and report["result"] is None
    plan = report["plan"]
    assert [j["id"] for j in plan["jobs"]["stuck_registering"]] == [garbage["stuck"]]
    assert [j["id"] for j in plan["jobs"]["expired"]] == [garbage["expired"]]
    assert sorted(j["id"] for j in plan["jobs"]["crh_missing"]) == sorted(
        [garbage["crh_gone_finished"], garbage["crh_gone_queued"]]
    )
    assert all("does not exist" in j["why"] for j in plan["jobs"]["crh_missing"])
    assert [j["id"] for j in plan["expiring"]] == [garbage["expiring_soon"]]
    blob_shas = {b["sha256"] for b in plan["blobs"]}
    assert garbage["orphan_sha"] in blob_shas and garbage["result_sha"] in blob_shas
    assert garbage["partial_blob"] in {b["id"] for b in plan["blobs"] if not b["complete"]}
    assert plan["bytes"] == sum(b["bytes"] for b in plan["blobs"]) > 0
    assert set(plan["store_size"]) == {"binary_data", "blobs", "inversions", "events"}
    # The archive the kept job shares is not planned.
    shared = sql_rows(db_url, "SELECT input_sha256 FROM inversions WHERE id = %s", (garbage["shares_blob"],))[0][0]
    assert shared not in blob_shas
    assert _ids(db_url) == before_jobs and _blob_ids(db_url) == before_blobs

    text = run([script("crh"), "cleanup", "--dry-run"], cli_env)
    assert "dry run: nothing deleted" in text.stdout
    assert "stuck registrations" in text.stdout and "never retrieved within 30 days" in text.stdout
    assert "will be purged within the next 7 days" in text.stderr
    assert garbage["paths"][garbage["expiring_soon"]] in text.stderr
    assert _ids(db_url) == before_jobs


def test_refuses_without_a_terminal_and_without_yes(garbage, cli_env, db_url):
    before = _ids(db_url), _blob_ids(db_url)
    proc = subprocess.run(
        crh_cleanup(), env=cli_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "no terminal" in proc.stderr and "--dry-run" in proc.stderr and "--yes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (_ids(db_url), _blob_ids(db_url)) == before


def _on_terminal(args, env, answer: str) -> tuple[int, str]:
    """Run with a pseudo-terminal as stdin and answer the question."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(args, env=env, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
        os.close(slave)
    return proc.returncode, out + err


def test_asks_on_a_terminal(garbage, cli_env, db_url):
    before = _ids(db_url)
    code, output = _on_terminal([script("crh"), "cleanup"], cli_env, "n")
    assert code == 0 and "Delete 4 jobs and" in output and "nothing deleted" in output
    assert _ids(db_url) == before
    code, output = _on_terminal([script("crh"), "cleanup"], cli_env, "y")
    assert code == 0, output
    assert "deleted 4 jobs and" in output and "freed" in output
    assert garbage["expired"] not in _ids(db_url)


def test_yes_deletes_the_garbage_and_keeps_everything_in_use(garbage, cli_env, db_url):
    shared = sql_rows(db_url, "SELECT input_sha256 FROM inversions WHERE id = %s", (garbage["shares_blob"],))[0][0]
    sizes = dict(sql_rows(db_url, "SELECT sha256, size FROM blobs WHERE complete"))
    proc = subprocess.run(
        crh_cleanup() + ["--yes", "--json"], env=cli_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    gone = {garbage[k] for k in ("stuck", "expired", "crh_gone_finished", "crh_gone_queued")}
    assert report["applied"] is True and set(report["result"]["deleted_jobs"]) == gone
    left = _ids(db_url)
    assert not gone & left
    for keep in ("crh_gone_running", "retrieved_no_crh", "other_host_no_crh", "shares_blob", "fresh", "expiring_soon"):
        assert garbage[keep] in left, keep
    # Their events went with them.
    assert sql_rows(db_url, "SELECT count(*) FROM events WHERE job_id = ANY(%s)", (sorted(gone),))[0][0] == 0
    # Every archive still referred to by a job is there, complete, with all its chunks.
    missing = sql_rows(
        db_url,
        "SELECT j.id FROM inversions j WHERE (j.input_sha256 IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM blobs b WHERE b.sha256 = j.input_sha256 AND b.complete)) OR (j.result_sha256 IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.sha256 = j.result_sha256 AND b.complete))",
    )
    assert missing == []
    assert sql_rows(db_url, "SELECT count(*) FROM blobs WHERE sha256 = %s", (shared,))[0][0] == 1
    with psycopg.connect(db_url) as conn:
        assert len(b"".join(store.chunks(conn, shared))) == sizes[shared]
    # What was freed: the orphans, the interrupted upload, and the deleted jobs' own archives.
    remaining = {r[0] for r in sql_rows(db_url, "SELECT sha256 FROM blobs WHERE sha256 IS NOT NULL")}
    assert garbage["orphan_sha"] not in remaining and garbage["result_sha"] not in remaining
    assert garbage["partial_blob"] not in _blob_ids(db_url)
    assert sql_rows(db_url, "SELECT count(*) FROM binary_data WHERE blob_id = %s", (garbage["partial_blob"],))[0][0] == 0
    result = report["result"]
    freed_complete = sum(sizes[s] for s in sizes if s not in remaining)
    assert result["bytes_freed"] >= freed_complete > 0
    assert set(result["store_size_before"]) == set(result["store_size_after"]) == {"binary_data", "blobs", "inversions", "events"}
    # A second run finds nothing.
    again = json.loads(run([script("crh"), "cleanup", "--dry-run", "--json"], cli_env).stdout)
    assert not any(again["plan"]["jobs"].values()) and again["plan"]["blobs"] == []
    text = run([script("crh"), "cleanup", "--yes"], cli_env)
    assert "nothing to clean up" in text.stdout


def test_retention_and_only(garbage, cli_env, db_url):
    proc = run([script("crh"), "cleanup", "--only", "expired", "--retention", "20", "--yes", "--json"], cli_env)
    report = json.loads(proc.stdout)
    assert set(report["result"]["deleted_jobs"]) == {garbage["expired"], garbage["expiring_soon"]}
    # Only the archives those two jobs released go with them (their inputs and the expired job's result);
    # the orphan that was there before waits for the blobs kind.
    planned = {b["sha256"] for b in report["plan"]["blobs"]}
    assert garbage["result_sha"] in planned and garbage["orphan_sha"] not in planned
    assert sorted(report["result"]["deleted_blobs"]) == sorted(b["id"] for b in report["plan"]["blobs"])
    assert garbage["stuck"] in _ids(db_url) and garbage["crh_gone_queued"] in _ids(db_url)
    proc = run([script("crh"), "cleanup", "--only", "blobs", "--yes", "--json"], cli_env)
    report = json.loads(proc.stdout)
    assert report["result"]["deleted_jobs"] == [] and report["result"]["deleted_blobs"]
    assert garbage["stuck"] in _ids(db_url)
    run([script("crh"), "cleanup", "--retention", "0", "--dry-run"], cli_env, check=2)


def test_crh_naming_another_job_counts_as_gone(tmp_path, cli_env, db_url):
    added = _added(tmp_path, cli_env, n=1)
    (path, old), = added.items()
    _finish(db_url, old)
    report = json.loads(run([script("crh_add"), "--json", "--force"], cli_env, cwd=tmp_path / "tree0").stdout)
    new = report["added"][0]["job_id"]
    assert new != old
    plan = json.loads(run([script("crh"), "cleanup", "--dry-run", "--json", "--only", "crh_missing"], cli_env).stdout)["plan"]
    assert [(j["id"], j["why"]) for j in plan["jobs"]["crh_missing"]] == [(old, f"{path}.crh now names job {new}")]


def test_a_crh_that_cannot_be_checked_keeps_its_job(tmp_path, cli_env, db_url):
    """Only a .crh certainly gone counts: an error other than "no such file" keeps the job.

    (A symlink loop in the path gives ELOOP even to root; an unreadable directory gives EACCES.)"""
    added = _added(tmp_path, cli_env, n=1)
    (path, job_id), = added.items()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    sql_rows(db_url, "UPDATE inversions SET crh_file = %s WHERE id = %s", (str(loop / "td.crh"), job_id))
    proc = run([script("crh"), "cleanup", "--dry-run", "--json"], cli_env, check=1)
    plan = json.loads(proc.stdout)["plan"]
    assert plan["jobs"]["crh_missing"] == []
    assert any(f"job {job_id}: cannot check {loop / 'td.crh'}" in p and "kept" in p for p in plan["problems"])
    text = run([script("crh"), "cleanup", "--dry-run"], cli_env, check=1)
    assert "cannot check" in text.stderr


def test_apply_keeps_what_changed_since_the_plan(garbage, db_url):
    """The deletion re-checks each planned row: a job retrieved meanwhile, an archive taken up, stay."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        planned = cleanup.plan(conn, cleanup.CleanupOptions())
        expired = garbage["expired"]
        assert expired in {j for j, _ in planned.job_ids}
        # Meanwhile: the expired job is retrieved after all, and a new job takes up the orphan archive.
        conn.execute("UPDATE inversions SET downloaded = true WHERE id = %s", (expired,))
        conn.execute(
            "UPDATE inversions SET input_sha256 = %s WHERE id = %s", (garbage["orphan_sha"], garbage["fresh"])
        )
        # ... and a .crh comes back (restored from a backup) before the user said yes.
        restored = garbage["crh_gone_queued"]
        with open(garbage["paths"][restored] + ".crh", "wb") as fh:
            fh.write(garbage["crh_bytes"][restored])
        result = cleanup.apply(conn, planned, store.DATABASE)
    assert expired in result.kept_jobs and expired in _ids(db_url)
    assert restored in result.kept_jobs and restored in _ids(db_url)
    assert garbage["crh_gone_finished"] in result.deleted_jobs
    orphan_id = sql_rows(db_url, "SELECT id FROM blobs WHERE sha256 = %s", (garbage["orphan_sha"],))[0][0]
    assert orphan_id in result.kept_blobs
    # The expired job's own archives are still referred to by it, so they stay too.
    assert sql_rows(db_url, "SELECT count(*) FROM blobs WHERE sha256 = %s", (garbage["result_sha"],))[0][0] == 1
    assert garbage["stuck"] in result.deleted_jobs


def test_young_orphans_and_uploads_in_progress_are_left_alone(tmp_path, cli_env, db_url):
    _added(tmp_path, cli_env, n=1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        _partial_upload(conn, b"an upload still streaming in")
    _blob(db_url, b"sealed a moment ago, its job is being registered")
    plan = json.loads(run([script("crh"), "cleanup", "--dry-run", "--json"], cli_env).stdout)["plan"]
    assert plan["blobs"] == [] and not any(plan["jobs"].values())


def test_only_an_admin_may_clean_up(garbage, cli_env, db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        roles.grant(conn, "cl_user", roles.USER)
        roles.grant(conn, "cl_boss", roles.ADMIN)
    user, boss = ({**cli_env, "CRH_DATABASE_URL": conninfo.make_conninfo(db_url, user=n)} for n in ("cl_user", "cl_boss"))
    proc = run([script("crh"), "cleanup", "--dry-run"], user, check=2)
    assert "crh_admin" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads(run([script("crh"), "cleanup", "--yes", "--json"], boss).stdout)
    assert garbage["expired"] in report["result"]["deleted_jobs"]
