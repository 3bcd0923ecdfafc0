"""The five attacks of issue 15, each by name, as the attacking login with plain SQL (psql).

Set up as docs/security.md says: the owner ran the migrations, ``alice`` and
``bob`` are logins of ``crh db grant-user``, ``w1`` of ``crh db grant-worker``.
Each test runs twice: on a database at revision 0004 (the previous head),
where the attack goes through, which the test asserts; and at head (0005 and
later), where the database refuses it, which the test shows.

The jobs are put in place by the owner with plain SQL (the query layer of this
version speaks to the head schema only); the archives are uploaded by their
logins through the store, whose statements both revisions share.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, errors, sql

from cr_queue import add, store
from cr_queue import status as crh_status
from cr_queue.db import migrate
from cr_queue.db.connection import Database
from cr_queue.queries import jobs, roles, workers
from cr_queue.tomodir import synth

ALICE, BOB, W1 = "alice", "bob", "w1"
PREVIOUS = "0004"
MIN_BIGINT = -9223372036854775808
ACTOR = jobs.Actor(os_user="alice", host="ws1", pid=1)
TEMPLATE_PREVIOUS = "crh_template_0004"


@pytest.fixture(scope="session")
def previous_template(pg_cluster) -> str:
    """A template database at the previous head, 0004."""
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_PREVIOUS)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_PREVIOUS)))
    url = conninfo.make_conninfo(pg_cluster.url, dbname=TEMPLATE_PREVIOUS)
    migrate.upgrade(url, PREVIOUS)
    return url


@pytest.fixture(scope="session")
def attackers(template_url: str) -> None:
    """alice and bob as `crh db grant-user`, w1 as `crh db grant-worker` (roles are cluster-wide)."""
    with psycopg.connect(template_url, autocommit=True) as owner:
        for name in (ALICE, BOB):
            roles.grant(owner, name, roles.USER)
        roles.grant(owner, W1, roles.WORKER)


@dataclass
class World:
    url: str
    revision: str
    tmp: Path

    @property
    def at_head(self) -> bool:
        return self.revision == "head"

    def as_(self, login: str) -> psycopg.Connection:
        return psycopg.connect(conninfo.make_conninfo(self.url, user=login), autocommit=True)

    def owner(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def upload(self, login: str, seed: int) -> str:
        """An archive of a tomodir, uploaded by ``login``; its sha256."""
        tomodir = synth.make_tomodir(self.tmp / f"{login}-{seed}", "inv", seed=seed)
        with self.as_(login) as conn:
            return store.put_tree(conn, store.DATABASE, tomodir).sha256

    def queued_job(self, login: str, seed: int, **columns) -> int:
        """A queued job of ``login`` with its own input, as crh_add leaves it (put in place by the owner)."""
        sha = self.upload(login, seed)
        values = {
            "status": "queued", "sim_type": "inv", "username": login, "db_role": login,
            "source_computer": "ws", "source_path": f"/home/{login}/td{seed}", "crh_file": f"/home/{login}/td{seed}.crh",
            "input_sha256": sha, "fair_rank": seed, "datetime_queued": None, **columns,
        }
        names = sql.SQL(", ").join(map(sql.Identifier, values))
        marks = sql.SQL(", ").join(
            sql.SQL("now()") if value is None else sql.Placeholder() for value in values.values()
        )
        statement = sql.SQL("INSERT INTO inversions ({}) VALUES ({}) RETURNING id").format(names, marks)
        with self.owner() as owner:
            return owner.execute(statement, [v for v in values.values() if v is not None]).fetchone()[0]

    def job(self, job_id: int) -> dict:
        with self.owner() as owner:
            cur = owner.execute("SELECT * FROM inversions WHERE id = %s", (job_id,))
            names = [c.name for c in cur.description]
            return dict(zip(names, cur.fetchone()))

    def events(self, job_id: int) -> list[str]:
        with self.owner() as owner:
            return [r[0] for r in owner.execute("SELECT event FROM events WHERE job_id = %s ORDER BY id", (job_id,))]

    def worker(self, login: str) -> int:
        """A worker row of ``login``, registered as crh_worker registers."""
        with self.as_(login) as conn:
            return workers.register_worker(
                conn, name=f"{login}-1", host="node01", pid=7, version="t", jobs=1, threads=1, groups=[], solvers={}
            )

    def hold(self, job_id: int, worker_id: int) -> None:
        """The owner puts a job in the hands of a worker (a claim, attempt 1)."""
        with self.owner() as owner:
            owner.execute(
                "UPDATE inversions SET status = 'running', worker_id = %s, attempt = attempt + 1, tries = tries + 1,"
                " datetime_started = now(), lease_expires = now() + interval '1 hour' WHERE id = %s",
                (worker_id, job_id),
            )


@pytest.fixture(params=[PREVIOUS, "head"])
def world(request, pg_cluster, template_url, previous_template, attackers, tmp_path) -> World:
    template = TEMPLATE_PREVIOUS if request.param == PREVIOUS else conninfo.conninfo_to_dict(template_url)["dbname"]
    name = f"a_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    yield World(conninfo.make_conninfo(pg_cluster.url, dbname=name), request.param, tmp_path)
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --------------------------------------------------------------------- 1


def test_attack_1_a_user_breaks_everyones_crh_add(world):
    """bob sets his own job's fair_rank to the smallest bigint: at 0004 the column grant allows
    it and the front of the queue minus one, which every crh_add computes, overflows."""
    bobs = world.queued_job(BOB, 1)
    world.queued_job(ALICE, 2)
    with world.as_(BOB) as bob:
        if not world.at_head:
            assert bob.execute("UPDATE inversions SET fair_rank = %s WHERE id = %s", (MIN_BIGINT, bobs)).rowcount == 1
            with world.as_(ALICE) as alice, pytest.raises(errors.NumericValueOutOfRange, match="bigint out of range"):
                alice.execute("SELECT crh_queue_front() - 1")  # what 0004's finish_registrations computes
            return
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            bob.execute("UPDATE inversions SET fair_rank = %s WHERE id = %s", (MIN_BIGINT, bobs))
    with world.owner() as owner, pytest.raises(errors.CheckViolation, match="ck_inversions_fair_rank"):
        owner.execute("UPDATE inversions SET fair_rank = %s WHERE id = %s", (MIN_BIGINT, bobs))
    # alice's crh_add works, and queues her job
    synth.make_tree(world.tmp / "alice-add", n_inv=1, seed=5)
    db = Database(url=conninfo.make_conninfo(world.url, user=ALICE), source="test", embedded=False, store=store.DATABASE)
    report = add.add(db, [world.tmp / "alice-add"], add.AddOptions())
    assert not report.problems and len(report.added) == 1
    assert world.job(report.added[0].job_id)["status"] == "queued"


# --------------------------------------------------------------------- 2


def test_attack_2_a_user_poses_as_another_and_jumps_the_queue(world):
    """bob rewrites his queued job as alice's, at a priority above the documented cap and at the
    head of the round robin."""
    world.queued_job(ALICE, 1)
    bobs = world.queued_job(BOB, 2)
    forge = "UPDATE inversions SET username = 'alice', priority = 2147483647, fair_rank = %s WHERE id = %s"
    with world.as_(BOB) as bob:
        if not world.at_head:
            assert bob.execute(forge, (MIN_BIGINT, bobs)).rowcount == 1
            with world.owner() as owner:  # what 0004's crh status showed: alice, top priority 2147483647
                rows = owner.execute(
                    "SELECT username, max(priority) FROM inversions WHERE status = 'queued' GROUP BY username"
                ).fetchall()
            assert rows == [("alice", 2147483647)]
            return
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            bob.execute(forge, (MIN_BIGINT, bobs))
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            bob.execute("UPDATE inversions SET username = 'alice' WHERE id = %s", (bobs,))
        # through the function: the documented cap holds
        with pytest.raises(errors.CheckViolation, match="ck_inversions_priority"):
            jobs.set_priority(bob, [bobs], 2147483647, ACTOR)
        assert jobs.set_priority(bob, [bobs], 1_000_000, ACTOR) == [bobs]
    with world.owner() as owner:
        # Even where the informational username says otherwise (only the owner can write it
        # now), crh status groups by login, as fair share does.
        owner.execute("UPDATE inversions SET username = 'alice' WHERE id = %s", (bobs,))
        depth = crh_status.snapshot(owner)["queue_depth"]
    assert {(d["username"], d["top_priority"]) for d in depth} == {(ALICE, 0), (BOB, 1_000_000)}


# --------------------------------------------------------------------- 3


def test_attack_3_the_worker_login_reads_every_users_finished_results(world):
    """w1 reads the result of alice's finished job, a job none of its workers holds."""
    alices = world.queued_job(ALICE, 1)
    wid = world.worker(W1)
    result = world.upload(W1, 99)  # what its worker sent back for alice's job
    world.hold(alices, wid)
    with world.owner() as owner:
        owner.execute(
            "UPDATE inversions SET status = 'finished', result_sha256 = %s, datetime_finished = now() WHERE id = %s",
            (result, alices),
        )
    with world.as_(W1) as w1:
        if not world.at_head:
            assert store.fetch(w1, store.DATABASE, result, io.BytesIO()) > 0
            return
        with pytest.raises(store.BlobMissing):
            store.fetch(w1, store.DATABASE, result, io.BytesIO())
        assert w1.execute("SELECT count(*) FROM blobs WHERE sha256 = %s", (result,)).fetchone()[0] == 0
    # what it may read: the input of a job one of its workers holds now
    bobs = world.queued_job(BOB, 2)
    world.hold(bobs, wid)
    with world.as_(W1) as w1:
        assert store.fetch(w1, store.DATABASE, world.job(bobs)["input_sha256"], io.BytesIO()) > 0
        with pytest.raises(store.BlobMissing):  # the input of a job that has ended
            store.fetch(w1, store.DATABASE, world.job(alices)["input_sha256"], io.BytesIO())


# --------------------------------------------------------------------- 4


def test_attack_4_the_worker_login_finishes_a_job_it_never_claimed(world):
    """w1 marks alice's queued job finished without a result: no worker, no event; alice's
    retrieve would then find nothing and call it done."""
    alices = world.queued_job(ALICE, 1)
    wid = world.worker(W1)
    forge = "UPDATE inversions SET status = 'finished', result_sha256 = NULL WHERE id = %s"
    with world.as_(W1) as w1:
        if not world.at_head:
            assert w1.execute(forge, (alices,)).rowcount == 1
            job = world.job(alices)
            assert (job["status"], job["result_sha256"], job["worker_id"]) == ("finished", None, None)
            assert world.events(alices) == []
            return
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            w1.execute(forge, (alices,))
        # through the function: the fence refuses a job its worker does not hold
        never_claimed = jobs.Job(**{**_job_fields(world.job(alices)), "worker_id": wid, "attempt": 0})
        actor = jobs.Actor(os_user="crh", host="node01", pid=7, worker_id=wid)
        result = world.upload(W1, 99)
        assert not jobs.complete(w1, never_claimed, result_sha256=result, exit_code=0, actor=actor)
        # nor may it name a worker of another login
        other = world.worker(W1)
        with world.owner() as owner:
            owner.execute("UPDATE workers SET db_role = 'someone_else' WHERE id = %s", (other,))
        with pytest.raises(errors.InsufficientPrivilege, match="is not a worker of w1"):
            jobs.claim(w1, actor=jobs.Actor(worker_id=other), can_mod=True, can_inv=True, lease_s=30)
    with world.owner() as owner, pytest.raises(errors.CheckViolation, match="ck_inversions_finished_has_result"):
        owner.execute(forge, (alices,))
    job = world.job(alices)
    assert (job["status"], job["worker_id"]) == ("queued", None)
    assert world.events(alices) == []


def _job_fields(row: dict) -> dict:
    return {name: row[name] for name in jobs.Job.__dataclass_fields__}


# --------------------------------------------------------------------- 5


def test_attack_5_direct_sql_bypasses_the_history(world):
    """alice cancels and requeues her running job in psql: no events, and the requeued job
    keeps the worker that no longer runs it."""
    alices = world.queued_job(ALICE, 1)
    wid = world.worker(W1)
    world.hold(alices, wid)
    with world.as_(ALICE) as alice:
        if not world.at_head:
            assert alice.execute("UPDATE inversions SET status = 'cancelled' WHERE id = %s", (alices,)).rowcount == 1
            assert alice.execute("UPDATE inversions SET status = 'queued' WHERE id = %s", (alices,)).rowcount == 1
            job = world.job(alices)
            assert (job["status"], job["worker_id"]) == ("queued", wid)
            assert world.events(alices) == []
            return
        for statement in (
            "UPDATE inversions SET status = 'cancelled' WHERE id = %s",
            "UPDATE inversions SET status = 'queued' WHERE id = %s",
            "UPDATE inversions SET worker_id = NULL WHERE id = %s",
        ):
            with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
                alice.execute(statement, (alices,))
        # the way that is left writes the history and clears the worker
        assert jobs.cancel(alice, [alices], ACTOR) == [alices]
        assert jobs.requeue(alice, [alices], ACTOR) == [alices]
    job = world.job(alices)
    assert (job["status"], job["worker_id"]) == ("queued", None)
    with world.owner() as owner:
        rows = owner.execute("SELECT event, db_role, os_user FROM events WHERE job_id = %s ORDER BY id", (alices,)).fetchall()
    assert rows == [("cancelled", ALICE, "alice"), ("requeued", ALICE, "alice")]
    # and bob cannot do it to alice's job through the functions either
    with world.as_(BOB) as bob:
        assert jobs.cancel(bob, [alices], ACTOR) == []
