"""Many users, one database: two scientists, a compute node and an admin as real roles.

Every check connects as the role itself (``user=NAME`` over the test
cluster's socket) and goes through the query layer or plain SQL, as a user
with psql would: row-level security and the grants of migration 0003 must
hold against both.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, errors

from cr_queue import add
from cr_queue.tomodir import archive
from cr_queue.queries import jobs, workers
from cr_queue.queries import admin, roles
from cr_queue import store
from cr_queue.tomodir import synth
from cr_queue.db.connection import Database

from .conftest import run, script

ALICE, BOB, NODE, OTHER_NODE, BOSS = "sec_alice", "sec_bob", "sec_node", "sec_node2", "sec_boss"
ACTOR = jobs.Actor(os_user="tester", host="ws1", pid=1)


@pytest.fixture(scope="session")
def logins(template_url: str) -> dict[str, str]:
    """Login roles of the test cluster (roles are cluster-wide; grants are cloned with the template)."""
    with psycopg.connect(template_url, autocommit=True) as conn:
        for name in (ALICE, BOB):
            roles.grant(conn, name, roles.USER)
        for name in (NODE, OTHER_NODE):
            roles.grant(conn, name, roles.WORKER)
        roles.grant(conn, BOSS, roles.ADMIN)
    return {"alice": ALICE, "bob": BOB, "node": NODE, "node2": OTHER_NODE, "boss": BOSS}


def url_as(db_url: str, name: str) -> str:
    return conninfo.make_conninfo(db_url, user=name)


def connect_as(db_url: str, name: str) -> psycopg.Connection:
    return psycopg.connect(url_as(db_url, name), autocommit=True)


def database_as(db_url: str, name: str) -> Database:
    return Database(url=url_as(db_url, name), source="test", embedded=False, store=store.DATABASE)


def _add_tree(db_url: str, name: str, root: Path, **kw) -> list[int]:
    synth.make_tree(root, **(kw or {"n_inv": 2}))
    report = add.add(database_as(db_url, name), [root], add.AddOptions())
    assert not report.problems, report.problems
    return [a.job_id for a in report.added]


def _blob(conn, payload: bytes) -> str:
    writer = store.Upload(conn, store.DATABASE, chunk_size=4)
    writer.write(payload)
    return writer.seal(hashlib.sha256(payload).hexdigest(), len(payload))


def _own_job(conn, path: str) -> int:
    new = jobs.NewJob(
        sim_type="inv", model_first=False, source_path=path, crh_file=path + ".crh", username="bob", source_computer="ws2"
    )
    return jobs.begin_registration(conn, new, ACTOR)


@pytest.fixture
def two_users(db_url, logins, tmp_path):
    """alice has two queued jobs, bob one; returns their job ids."""
    alice_jobs = _add_tree(db_url, ALICE, tmp_path / "alice")
    bob_jobs = _add_tree(db_url, BOB, tmp_path / "bob", n_inv=1, seed=7)
    return alice_jobs, bob_jobs


def test_a_user_sees_only_own_jobs_and_others_as_anonymous_counts(db_url, two_users):
    alice_jobs, bob_jobs = two_users
    with connect_as(db_url, BOB) as bob:
        assert roles.access(bob) == "user"
        assert bob.execute("SELECT count(*) FROM inversions").fetchone()[0] == 1
        assert jobs.get_jobs(bob, alice_jobs) == {}
        assert set(jobs.get_jobs(bob, bob_jobs)) == set(bob_jobs)
        assert jobs.events_of(bob, alice_jobs[0]) == []
        assert jobs.events_of(bob, bob_jobs[0]) != []
        assert bob.execute("SELECT count(*) FROM events").fetchone()[0] == len(jobs.events_of(bob, bob_jobs[0]))
        counts = admin.queue_counts(bob)
    assert counts == [{"status": "queued", "group": None, "jobs": 3}]
    with connect_as(db_url, ALICE) as alice:
        assert sorted(r[0] for r in alice.execute("SELECT id FROM inversions")) == sorted(alice_jobs)


def test_a_user_cannot_cancel_requeue_reprioritise_or_delete_others_jobs(db_url, two_users):
    alice_jobs, _ = two_users
    actor = jobs.Actor(os_user="bob", host="ws2", pid=2)
    with connect_as(db_url, BOB) as bob:
        assert jobs.cancel(bob, alice_jobs, actor) == []
        assert jobs.set_priority(bob, alice_jobs, 1000, actor) == []
        assert jobs.requeue(bob, alice_jobs, actor) == []
        assert not jobs.mark_downloaded(bob, alice_jobs[0], actor)
        # psql by hand: nothing to see, so nothing changes
        assert bob.execute("UPDATE inversions SET priority = 99 WHERE id = ANY(%s)", (alice_jobs,)).rowcount == 0
        assert bob.execute("DELETE FROM inversions WHERE id = ANY(%s)", (alice_jobs,)).rowcount == 0
        with pytest.raises(errors.InsufficientPrivilege):
            bob.execute("DELETE FROM events")
        with pytest.raises(errors.InsufficientPrivilege):
            bob.execute("TRUNCATE inversions")
    with psycopg.connect(db_url) as owner:
        rows = owner.execute(
            "SELECT status, priority FROM inversions WHERE id = ANY(%s)", (alice_jobs,)
        ).fetchall()
    assert rows == [("queued", 0)] * len(alice_jobs)


def test_a_user_cannot_read_others_archives(db_url, two_users):
    alice_jobs, _ = two_users
    with psycopg.connect(db_url) as owner:
        sha, blob_id = owner.execute(
            "SELECT b.sha256, b.id FROM inversions j JOIN blobs b ON b.sha256 = j.input_sha256 WHERE j.id = %s",
            (alice_jobs[0],),
        ).fetchone()
    with connect_as(db_url, BOB) as bob:
        with pytest.raises(store.BlobMissing):
            store.fetch(bob, store.DATABASE, sha, io.BytesIO())
        assert bob.execute("SELECT count(*) FROM blobs WHERE sha256 = %s", (sha,)).fetchone()[0] == 0
        assert bob.execute("SELECT count(*) FROM blob_chunks WHERE blob_id = %s", (blob_id,)).fetchone()[0] == 0
        with pytest.raises(errors.InsufficientPrivilege):
            bob.execute("SELECT count(*) FROM binary_data")
    with connect_as(db_url, ALICE) as alice:
        # her own upload she may read back
        assert store.fetch(alice, store.DATABASE, sha, io.BytesIO()) > 0


def test_knowing_the_hash_of_another_users_archive_gives_no_access(db_url, two_users, tmp_path):
    """The sha256 is in the (often world-readable) .crh file; it must not work as a key."""
    alice_jobs, _ = two_users
    with psycopg.connect(db_url) as owner:
        sha = owner.execute("SELECT input_sha256 FROM inversions WHERE id = %s", (alice_jobs[0],)).fetchone()[0]
    with connect_as(db_url, BOB) as bob:
        job = _own_job(bob, "/home/bob/steal")
        with pytest.raises(errors.InsufficientPrivilege, match="was not uploaded by"):
            jobs.finish_registration(bob, job, sha, ACTOR)
        with pytest.raises(errors.InsufficientPrivilege, match="was not uploaded by"):
            bob.execute(
                "INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file, input_sha256)"
                " VALUES ('queued', 'inv', 'bob', 'ws2', '/x', '/x.crh', %s)",
                (sha,),
            )
        # Claiming the hash for other bytes: the database compares, shares nothing.
        forged = store.Upload(bob, store.DATABASE, chunk_size=4)
        forged.write(b"not alice's archive")
        forged.seal(sha)
        assert bob.execute("SELECT count(*) FROM blob_owners").fetchone()[0] == 0
        assert bob.execute("SELECT crh_adopt_blob(0, %s)", (sha,)).fetchone()[0] is False
        with pytest.raises(errors.InsufficientPrivilege):
            jobs.finish_registration(bob, job, sha, ACTOR)
        with pytest.raises(store.BlobMissing):
            store.fetch(bob, store.DATABASE, sha, io.BytesIO())


def test_archives_stored_together_share_what_another_user_stored_after_comparison(db_url, logins, tmp_path):
    """store.put_many (crh_add's helpers' batches): one of bob's archives is the same
    bytes as one alice stored, which bob may not see.  The batch falls back to one
    careful upload each: the database compares and shares alice's copy, the other
    archive is stored; bob can read both, and nothing is stored twice."""
    shared = synth.make_tomodir(tmp_path / "alice" / "td", "inv", seed=1)
    own = synth.make_tomodir(tmp_path / "bob" / "td", "inv", seed=2)
    with connect_as(db_url, ALICE) as alice:
        sha = store.put_tree(alice, store.DATABASE, shared).sha256
    packed = []
    for tree in (shared, own):
        buf = io.BytesIO()
        result = archive.pack(tree, buf)
        packed.append(([buf.getvalue()], result))
    assert packed[0][1].sha256 == sha
    with connect_as(db_url, BOB) as bob:
        store.put_many(bob, store.DATABASE, packed)
        for pieces, result in packed:
            out = io.BytesIO()
            store.fetch(bob, store.DATABASE, result.sha256, out)
            assert out.getvalue() == pieces[0]
    with psycopg.connect(db_url) as owner:
        assert owner.execute("SELECT count(*) FROM blobs WHERE sha256 = %s", (sha,)).fetchone()[0] == 1
        assert owner.execute("SELECT count(*) FROM blobs").fetchone()[0] == 2
        assert owner.execute("SELECT count(*) FROM blob_owners").fetchone()[0] == 1


def test_identical_archives_of_two_users_are_stored_once_and_shared_after_comparison(db_url, logins, tmp_path):
    synth.make_tree(tmp_path / "alice", n_inv=1)
    # bob has byte-identical tomodirs (unpacked from the same tarball: same names, sizes, mtimes)
    shutil.copytree(tmp_path / "alice", tmp_path / "bob")
    alice_report = add.add(database_as(db_url, ALICE), [tmp_path / "alice"], add.AddOptions())
    bob_report = add.add(database_as(db_url, BOB), [tmp_path / "bob"], add.AddOptions())
    assert not bob_report.problems and len(bob_report.added) == 1
    with psycopg.connect(db_url) as owner:
        shas = owner.execute("SELECT DISTINCT input_sha256 FROM inversions").fetchall()
        assert len(shas) == 1
        assert owner.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1
        assert owner.execute("SELECT db_role FROM blob_owners").fetchall() == [(BOB,)]
    with connect_as(db_url, BOB) as bob:
        assert store.fetch(bob, store.DATABASE, shas[0][0], io.BytesIO()) > 0
    assert alice_report.added[0].job_id != bob_report.added[0].job_id


def test_a_user_cannot_forge_ownership_or_the_lifecycle_of_own_jobs(db_url, two_users):
    alice_jobs, bob_jobs = two_users
    mine = bob_jobs[0]
    with connect_as(db_url, BOB) as bob:
        for statement, params in (
            ("UPDATE inversions SET db_role = %s WHERE id = %s", (ALICE, mine)),
            ("UPDATE inversions SET attempt = 7 WHERE id = %s", (mine,)),
            ("UPDATE inversions SET source_path = '/etc' WHERE id = %s", (mine,)),
            (
                "INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file, db_role)"
                " VALUES ('queued', 'inv', 'x', 'h', '/p', '/p.crh', %s)",
                (ALICE,),
            ),
            ("UPDATE inversions SET status = 'finished' WHERE id = %s", (mine,)),
            ("UPDATE inversions SET status = 'running', worker_id = 1 WHERE id = %s", (mine,)),
            (
                "INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file)"
                " VALUES ('finished', 'inv', 'x', 'h', '/p', '/p.crh')",
                None,
            ),
            ("INSERT INTO events (job_id, event) VALUES (%s, 'forged')", (alice_jobs[0],)),
            ("UPDATE blobs SET db_role = %s", (ALICE,)),
            ("SET ROLE " + ALICE, None),
            ("SET ROLE crh_admin", None),
            ("SET ROLE crh_worker", None),
        ):
            with pytest.raises((errors.InsufficientPrivilege, errors.CheckViolation)):
                bob.execute(statement, params)
        # a result the worker never produced cannot be attached either
        with psycopg.connect(db_url) as owner:
            alice_sha = owner.execute("SELECT input_sha256 FROM inversions WHERE id = %s", (alice_jobs[0],)).fetchone()[0]
        with pytest.raises(errors.InsufficientPrivilege):
            bob.execute("UPDATE inversions SET status = 'cancelled' WHERE id = %s", (mine,))
        assert jobs.cancel(bob, [mine], ACTOR) == [mine]
        with pytest.raises(errors.InsufficientPrivilege):
            bob.execute("UPDATE inversions SET result_sha256 = %s WHERE id = %s", (alice_sha, mine))
        # what a user may do to its own job still works
        assert jobs.requeue(bob, [mine], ACTOR) == [mine]
        assert jobs.set_priority(bob, [mine], 5, ACTOR) == [mine]
        assert jobs.cancel(bob, [mine], ACTOR) == [mine]


def test_a_user_cannot_write_into_another_users_upload(db_url, logins):
    with connect_as(db_url, ALICE) as alice, connect_as(db_url, BOB) as bob:
        in_flight = alice.execute("INSERT INTO blobs DEFAULT VALUES RETURNING id").fetchone()[0]
        with pytest.raises(errors.InsufficientPrivilege, match="not an unfinished upload"):
            bob.execute("INSERT INTO binary_data (blob_id, chunk_no, data) VALUES (%s, 0, 'x')", (in_flight,))
        with pytest.raises(errors.InsufficientPrivilege):
            with bob.cursor().copy("COPY binary_data (blob_id, chunk_no, data) FROM STDIN") as copy:
                copy.write_row((in_flight, 1, b"x"))
        assert bob.execute("DELETE FROM blobs WHERE id = %s", (in_flight,)).rowcount == 0
        assert bob.execute("UPDATE blobs SET size = 1 WHERE id = %s", (in_flight,)).rowcount == 0


def test_a_worker_claims_runs_and_completes_but_cannot_delete(db_url, two_users, tmp_path):
    alice_jobs, bob_jobs = two_users
    with connect_as(db_url, NODE) as node:
        assert roles.access(node) == "worker"
        wid = workers.register_worker(
            node, name="n1", host="node01", pid=3, version="t", jobs=1, threads=1, groups=[], solvers={}
        )
        actor = jobs.Actor(os_user="crh", host="node01", pid=3, worker_id=wid)
        job = jobs.claim(node, actor=actor, can_mod=True, can_inv=True, lease_s=30)
        assert job is not None
        # its input it may read; the inputs of jobs it does not hold it may not
        assert store.fetch(node, store.DATABASE, job.input_sha256, io.BytesIO()) > 0
        with psycopg.connect(db_url) as owner:
            others = owner.execute(
                "SELECT input_sha256 FROM inversions WHERE id <> %s AND status = 'queued'", (job.id,)
            ).fetchall()
        for (sha,) in others:
            with pytest.raises(store.BlobMissing):
                store.fetch(node, store.DATABASE, sha, io.BytesIO())
        assert jobs.renew(node, wid, [(job.id, job.attempt)], 30) == {job.id}
        result_dir = tmp_path / "result"
        (result_dir / "inv").mkdir(parents=True)
        (result_dir / "inv" / "inv.ctr").write_text("***finished***\n")
        result = store.put_tree(node, store.DATABASE, result_dir)
        assert jobs.complete(node, job, result_sha256=result.sha256, exit_code=0, actor=actor)
        # no deleting, no editing what users registered, no touching ended jobs
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("DELETE FROM inversions WHERE id = %s", (job.id,))
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("DELETE FROM events")
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("UPDATE inversions SET source_path = '/etc', input_sha256 = NULL WHERE id = %s", (job.id,))
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("UPDATE inversions SET db_role = %s", (NODE,))
        with pytest.raises(errors.InsufficientPrivilege):  # state changes only through the functions (0005)
            node.execute("UPDATE inversions SET status = 'queued' WHERE id = %s", (job.id,))
        # nor can it read the result it just delivered: only inputs of jobs it holds
        with pytest.raises(store.BlobMissing):
            store.fetch(node, store.DATABASE, result.sha256, io.BytesIO())
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("SELECT * FROM binary_data LIMIT 1")
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("SELECT * FROM blob_owners")
        with pytest.raises(errors.InsufficientPrivilege):
            node.execute("SELECT * FROM events")
    # another node's account cannot pose as this worker
    with connect_as(db_url, OTHER_NODE) as node2:
        assert node2.execute("UPDATE workers SET last_heartbeat = now() WHERE id = %s", (wid,)).rowcount == 0
        with pytest.raises(errors.InsufficientPrivilege):
            node2.execute("DELETE FROM workers")
    # the owner retrieves the result; the other user cannot
    with connect_as(db_url, ALICE) as alice:
        assert store.fetch(alice, store.DATABASE, result.sha256, io.BytesIO()) > 0
    with connect_as(db_url, BOB) as bob:
        with pytest.raises(store.BlobMissing):
            store.fetch(bob, store.DATABASE, result.sha256, io.BytesIO())


def test_the_admin_sees_and_may_change_everything(db_url, two_users):
    alice_jobs, bob_jobs = two_users
    with connect_as(db_url, BOSS) as boss:
        assert roles.access(boss) == "admin"
        assert boss.execute("SELECT count(*) FROM inversions").fetchone()[0] == len(alice_jobs) + len(bob_jobs)
        sha = boss.execute("SELECT input_sha256 FROM inversions WHERE id = %s", (alice_jobs[0],)).fetchone()[0]
        assert store.fetch(boss, store.DATABASE, sha, io.BytesIO()) > 0
        assert boss.execute("SELECT count(*) FROM binary_data").fetchone()[0] > 0
        assert jobs.cancel(boss, bob_jobs, ACTOR) == bob_jobs
        assert boss.execute("DELETE FROM inversions WHERE id = %s", (bob_jobs[0],)).rowcount == 1


def test_grant_commands(db_url, logins, cli_env):
    crh = script("crh")
    env = dict(cli_env)
    proc = run([crh, "db", "grant-user", "sec_carol", "--json"], env)
    report = json.loads(proc.stdout)
    assert report["created"] and report["group"] == "crh_user" and not report["already_member"]
    proc = run([crh, "db", "grant-user", "sec_carol"], env)
    assert "was already a member of crh_user" in proc.stdout
    proc = run([crh, "db", "grant-worker", "sec_node3"], env)
    assert "created login role sec_node3" in proc.stdout and "\\password sec_node3" in proc.stdout
    for bad, why in (
        ("x; DROP TABLE inversions", "not a usable login name"),
        ("pg_monitor", "reserved"),
        ("public", "reserved"),
        ("crh_admin", "group roles"),
        ("a" * 64, "longer than"),
    ):
        proc = run([crh, "db", "grant-user", bad], env, check=2)
        assert why in proc.stderr and "Traceback" not in proc.stderr
    # a scientist cannot hand out roles
    env["CRH_DATABASE_URL"] = url_as(db_url, ALICE)
    proc = run([crh, "db", "grant-user", "sec_mallory"], env, check=2)
    assert "may not" in proc.stderr and "CREATEROLE" in proc.stderr and "Traceback" not in proc.stderr
    with connect_as(db_url, "sec_carol") as carol:
        assert roles.access(carol) == "user"
