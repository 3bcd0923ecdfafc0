"""Priorities, round robin between users, groups, duplicates and sipdirs, on real PostgreSQL."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import conninfo

from cr_queue.queries import jobs, roles
from cr_queue import store
from cr_queue.tomodir import synth

from .conftest import run, script
from .test_queue import ACTOR, _blob, _claim, _worker


LOGINS = ("sched_alice", "sched_bob", "sched_carol")


@pytest.fixture(scope="session")
def logins(template_url: str) -> None:
    """Fair share is by login (migration 0005): each user of these tests is a login of its own."""
    with psycopg.connect(template_url, autocommit=True) as owner:
        for name in LOGINS:
            roles.grant(owner, name, roles.USER)


def _queued_as(db_url: str, user: str, path: str, **kw) -> int:
    """A job registered and queued by the login ``sched_<user>``, as crh_add would."""
    new = jobs.NewJob(
        sim_type="inv", model_first=False, source_path=path, crh_file=path + ".crh",
        username=user, source_computer="ws", **kw,
    )
    with psycopg.connect(conninfo.make_conninfo(db_url, user=f"sched_{user}"), autocommit=True) as conn:
        job_id = jobs.begin_registration(conn, new, ACTOR)
        assert jobs.finish_registration(conn, job_id, _blob(conn, path.encode()), ACTOR)
    return job_id


def test_users_take_turns_within_a_priority(conn, db_url, logins):
    big = [_queued_as(db_url, "alice", f"/a/{i}") for i in range(50)]
    small = [_queued_as(db_url, "bob", f"/b/{i}") for i in range(3)]
    urgent = _queued_as(db_url, "carol", "/c/0", priority=10)
    actor = _worker(conn)
    order = [_claim(conn, actor).id for _ in range(8)]
    assert order[0] == urgent
    # Bob's three jobs are served in turns with Alice's, not after her fifty.
    assert order[1:7] == [big[0], small[0], big[1], small[1], big[2], small[2]]
    assert order[7] == big[3]


def test_late_small_user_is_not_stuck_behind_a_long_queue(conn, db_url, logins):
    actor = _worker(conn)
    big = [_queued_as(db_url, "alice", f"/a/{i}") for i in range(30)]
    served = [_claim(conn, actor).id for _ in range(20)]
    assert served == big[:20]
    late = _queued_as(db_url, "bob", "/b/late")
    assert [_claim(conn, actor).id for _ in range(2)] in ([late, big[20]], [big[20], late])


def test_priority_command_and_requeued_jobs_keep_their_turn(tmp_path, cli_env, db_url):
    tomodirs = synth.make_tree(tmp_path, n_inv=3)
    added = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tmp_path).stdout)["added"]
    last = added[-1]["job_id"]
    run([script("crh"), "priority", "5", str(tomodirs[-1])], cli_env)
    with psycopg.connect(db_url, autocommit=True) as conn:
        actor = _worker(conn)
        assert _claim(conn, actor).id == last
    proc = run([script("crh"), "priority", "5", "999999"], cli_env, check=1)
    assert "999999" in proc.stderr


def test_duplicate_content_already_queued_is_refused(tmp_path, cli_env, db_url):
    td = synth.make_tree(tmp_path, n_inv=1)[0]
    first = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tmp_path).stdout)["added"][0]["job_id"]
    proc = run([script("crh_add"), "--json", "--force"], cli_env, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert report["added"] == []
    assert f"job {first}" in report["skipped"][0]["reason"]
    assert json.loads(td.with_suffix(".crh").read_text())["job_id"] == first
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM inversions").fetchone()[0] == 1
    # Changed content is a new job.
    (td / "exe" / "crtomo.cfg").write_text((td / "exe" / "crtomo.cfg").read_text() + "\n")
    proc = run([script("crh_add"), "--json", "--force"], cli_env, cwd=tmp_path)
    assert len(json.loads(proc.stdout)["added"]) == 1


def test_groups_only_reach_their_workers(tmp_path, cli_env, db_url):
    synth.make_tree(tmp_path / "g", n_mod=2)
    synth.make_tree(tmp_path / "plain", n_mod=1)
    run([script("crh_add"), "--group", "gpu"], cli_env, cwd=tmp_path / "g")
    run([script("crh_add")], cli_env, cwd=tmp_path / "plain")
    out = json.loads(run([script("crh_worker"), "-q", "--json"], cli_env).stdout)
    assert out["finished"] == 1
    out = json.loads(run([script("crh_worker"), "-q", "--json", "--group", "gpu"], cli_env).stdout)
    assert out["finished"] == 2


def test_synthetic_sipdir_goes_through_and_is_grouped(tmp_path, cli_env, db_url):
    sipdir = synth.make_sipdir(tmp_path / "sip", [0.1, 1.0, 10.0])
    added = json.loads(run([script("crh_add"), "--json"], cli_env, cwd=tmp_path).stdout)["added"]
    assert len(added) == 3
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT DISTINCT sipdir FROM inversions").fetchall() == [(str(sipdir.resolve()),)]
    run([script("crh_worker"), "-q", "--jobs", "2"], cli_env)
    report = json.loads(run([script("crh_retrieve"), "--json", str(sipdir)], cli_env).stdout)
    assert len(report["retrieved"]) == 3


def test_real_sipdir_example_goes_through(examples_dir, tmp_path, cli_env):
    import shutil

    sipdir = tmp_path / "sipdir_complex"
    shutil.copytree(examples_dir / "sipdir_complex", sipdir, symlinks=True)
    added = json.loads(run([script("crh_add"), "--json", str(sipdir)], cli_env).stdout)["added"]
    assert len(added) == 13
    run([script("crh_worker"), "-q", "--jobs", "2"], cli_env)
    report = json.loads(run([script("crh_retrieve"), "--json", str(sipdir)], cli_env).stdout)
    assert len(report["retrieved"]) == 13 and not report["failed"]
    for freq in sorted((sipdir / "invmod").iterdir()):
        assert (freq / "inv" / "inv.ctr").read_text().splitlines()[-1].startswith("***finished***")
