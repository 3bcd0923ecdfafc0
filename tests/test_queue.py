"""The query layer against real PostgreSQL: registration, claim, fencing, rescue, store."""

from __future__ import annotations

import hashlib
import io
import os

import psycopg
import pytest

from cr_queue.queries import jobs, workers
from cr_queue import store

ACTOR = jobs.Actor(os_user="tester", host="testhost", pid=1)


def _new(path: str = "/data/td", **kw) -> jobs.NewJob:
    base = dict(
        sim_type="inv",
        model_first=False,
        source_path=path,
        crh_file=path + ".crh",
        username="tester",
        source_computer="ws1",
    )
    base.update(kw)
    return jobs.NewJob(**base)


def _queued(conn, path="/data/td", **kw) -> int:
    job_id = jobs.begin_registration(conn, _new(path, **kw), ACTOR)
    sha = _blob(conn, path.encode())
    assert jobs.finish_registration(conn, job_id, sha, ACTOR)
    return job_id


def _blob(conn, payload: bytes) -> str:
    writer = store.Upload(conn, store.DATABASE, chunk_size=4)
    writer.write(payload)
    return writer.seal(hashlib.sha256(payload).hexdigest(), len(payload))


def _worker(conn, name="w") -> jobs.Actor:
    wid = workers.register_worker(
        conn, name=name, host="node1", pid=2, version="t", jobs=1, threads=1, groups=[], solvers={}
    )
    return jobs.Actor(os_user="worker", host="node1", pid=2, worker_id=wid)


def _drop(observer, victim) -> None:
    """Close a connection as a dying worker would, and wait until the server has noticed."""
    pid = victim.info.backend_pid
    victim.close()
    for _ in range(500):
        gone = observer.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)"
            " AND NOT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s)",
            (pid, pid),
        ).fetchone()[0]
        if gone:
            return
        observer.execute("SELECT pg_sleep(0.01)")
    raise AssertionError(f"backend {pid} did not go away")


def _claim(conn, actor, **kw):
    params = dict(actor=actor, can_mod=True, can_inv=True, lease_s=30)
    params.update(kw)
    return jobs.claim(conn, **params)


def test_registering_job_is_invisible_until_finished(conn):
    job_id = jobs.begin_registration(conn, _new(), ACTOR)
    actor = _worker(conn)
    assert _claim(conn, actor) is None
    # An interrupted crh_add for the same directory takes the row over: no duplicate.
    assert jobs.begin_registration(conn, _new(), ACTOR) == job_id
    sha = _blob(conn, b"x")
    assert jobs.finish_registration(conn, job_id, sha, ACTOR)
    assert not jobs.finish_registration(conn, job_id, sha, ACTOR)
    job = _claim(conn, actor)
    assert job.id == job_id and job.attempt == 1 and job.status == "running"
    assert conn.execute("SELECT count(*) FROM inversions").fetchone()[0] == 1


def test_batch_registration_takes_over_interrupted_rows_and_records_events(conn):
    interrupted = jobs.begin_registration(conn, _new("/data/b"), ACTOR)
    ids = jobs.begin_registrations(conn, [_new("/data/a"), _new("/data/b", priority=5), _new("/data/c")], ACTOR)
    assert len(set(ids)) == 3 and ids[1] == interrupted
    rows = conn.execute("SELECT id, source_path, status, priority FROM inversions ORDER BY source_path").fetchall()
    assert rows == [(ids[0], "/data/a", "registering", 0), (ids[1], "/data/b", "registering", 5), (ids[2], "/data/c", "registering", 0)]
    events = conn.execute("SELECT job_id FROM events WHERE event = 'registering' ORDER BY id").fetchall()
    assert [e[0] for e in events] == [interrupted, ids[0], ids[2]]
    assert jobs.begin_registrations(conn, [], ACTOR) == []


def test_batch_finish_queues_in_order_with_the_ranks_and_events_of_single_finishes(conn):
    other = jobs.begin_registration(conn, _new("/data/other", username="bob"), ACTOR)
    jobs.finish_registration(conn, other, _blob(conn, b"o"), ACTOR)
    ids = jobs.begin_registrations(conn, [_new(f"/data/{n}") for n in "abc"], ACTOR)
    shas = [_blob(conn, n.encode()) for n in "abc"]
    assert jobs.finish_registrations(conn, list(zip(ids, shas)), ACTOR) == set(ids)
    assert jobs.finish_registrations(conn, list(zip(ids, shas)), ACTOR) == set(), "only registering jobs"
    rows = conn.execute("SELECT id, status, input_sha256, fair_rank FROM inversions WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, "queued", sha) for i, sha in zip(ids, shas)]
    # Fair share is by login (migration 0005): "bob" here is the same login, so the batch
    # follows its waiting job.
    assert [r[3] for r in rows] == [2, 3, 4], "consecutive ranks after the login's last waiting job, in the batch's order"
    details = conn.execute("SELECT job_id, detail->>'sha256' FROM events WHERE event = 'queued' AND job_id = ANY(%s) ORDER BY job_id", (ids,)).fetchall()
    assert details == list(zip(ids, shas))
    actor = _worker(conn)
    assert [_claim(conn, actor).id for _ in range(4)][:3] == [other, ids[0], ids[1]]


def test_claim_order_capabilities_and_groups(conn):
    low = _queued(conn, "/a", priority=0)
    high = _queued(conn, "/b", priority=5)
    mod = _queued(conn, "/c", sim_type="mod")
    both = _queued(conn, "/d", model_first=True)
    grouped = _queued(conn, "/e", job_group="big")
    actor = _worker(conn)
    assert _claim(conn, actor).id == high
    # A node without CRMod never takes modelling, nor an inversion that must model first.
    assert _claim(conn, actor, can_mod=False).id == low
    assert _claim(conn, actor, can_mod=False) is None
    assert _claim(conn, actor, can_inv=False).id == mod
    assert _claim(conn, actor).id == both
    assert _claim(conn, actor) is None
    assert _claim(conn, actor, groups=["big"]).id == grouped


def test_skip_locked_two_claimers_never_share_a_job(db_url):
    with psycopg.connect(db_url, autocommit=True) as setup:
        ids = {_queued(setup, f"/td{i}") for i in range(20)}
        actor = _worker(setup)
    claimed = []
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(2)]
    try:
        while True:
            got = [_claim(c, actor) for c in conns]
            claimed += [j.id for j in got if j]
            if not any(got):
                break
    finally:
        for c in conns:
            c.close()
    assert sorted(claimed) == sorted(ids)


def _alive_worker(db_url, conn, name="w"):
    """A worker as the daemon runs one: registered, holding its liveness lock on its own connection."""
    actor = _worker(conn, name)
    heartbeat = psycopg.connect(db_url, autocommit=True)
    assert workers.hold_worker_lock(heartbeat, actor.worker_id)
    return actor, heartbeat


def test_completion_is_fenced_on_the_attempt(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = _queued(conn)
        dying, heartbeat = _alive_worker(db_url, conn, "dying")
        first = _claim(conn, dying)
        # While the worker's lock is held nothing is rescued, whatever its heartbeat says.
        assert jobs.rescue(conn, ACTOR, grace_s=0) == []
        _drop(conn, heartbeat)  # the worker dies: its lock goes with its connection
        assert jobs.rescue(conn, ACTOR, grace_s=0) == [(job_id, "queued")]
        actor, _hb = _alive_worker(db_url, conn, "other")
        second = _claim(conn, actor)
        assert second.attempt == first.attempt + 1
        sha = _blob(conn, b"result")
        # The late first attempt is refused, the current one accepted, exactly once.
        assert not jobs.complete(conn, first, result_sha256=sha, exit_code=0, actor=dying)
        assert not jobs.fail(conn, first, category="x", reason="y", exit_code=1, result_sha256=None, actor=dying)
        assert jobs.renew(conn, dying.worker_id, [(job_id, first.attempt)], 30) == set()
        assert jobs.renew(conn, actor.worker_id, [(job_id, second.attempt)], 30) == {job_id}
        assert jobs.complete(conn, second, result_sha256=sha, exit_code=0, actor=actor)
        # A retry of that completion (its answer was lost) is recognised, not refused; still one event.
        assert jobs.complete(conn, second, result_sha256=sha, exit_code=0, actor=actor)
        assert not jobs.fail(conn, second, category="x", reason="y", exit_code=1, result_sha256=None, actor=actor)
        events = [e["event"] for e in jobs.events_of(conn, job_id)]
        assert events == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]


def test_a_fresh_heartbeat_protects_a_worker_that_lost_its_lock(db_url):
    """A network blip drops the lock, but a worker that still beats keeps its jobs."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = _queued(conn)
        actor, heartbeat = _alive_worker(db_url, conn)
        _claim(conn, actor)
        _drop(conn, heartbeat)
        workers.beat(conn, actor.worker_id, draining=False)
        assert jobs.rescue(conn, ACTOR, grace_s=60) == []
        assert jobs.rescue(conn, ACTOR, grace_s=0) == [(job_id, "queued")]


def test_rescue_leaves_live_workers_alone_and_fails_after_max_attempts(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        live_id = _queued(conn, "/live")
        job_id = _queued(conn, "/dying", max_attempts=2)
        live, _live_hb = _alive_worker(db_url, conn, "live")
        assert _claim(conn, live).id == live_id
        for expected in ("queued", "failed"):
            actor, heartbeat = _alive_worker(db_url, conn)
            assert _claim(conn, actor).id == job_id
            _drop(conn, heartbeat)
            assert jobs.rescue(conn, ACTOR, grace_s=0) == [(job_id, expected)]
        job = jobs.get_job(conn, job_id)
        assert job.status == "failed" and job.failure_category == "lost_worker"
        assert jobs.get_job(conn, live_id).status == "running"


def test_expired_lease_is_rescued_even_while_the_lock_is_held(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = _queued(conn)
        actor, _heartbeat = _alive_worker(db_url, conn)
        job = _claim(conn, actor, lease_s=0.01)
        assert job.id == job_id
        conn.execute("SELECT pg_sleep(0.05)")
        assert jobs.rescue(conn, ACTOR) == [(job_id, "queued")]


def test_cancel_and_requeue(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn, psycopg.connect(db_url, autocommit=True) as listener:
        workers.listen(listener)
        queued_id = _queued(conn, "/q")
        running_id = _queued(conn, "/r")
        actor, _hb = _alive_worker(db_url, conn)
        running = _claim(conn, actor)
        assert running.id == queued_id
        assert sorted(jobs.cancel(conn, [queued_id, running_id], ACTOR)) == [queued_id, running_id]
        notes = [n for n in listener.notifies(timeout=2) if n.channel == workers.CANCEL_CHANNEL]
        assert {int(n.payload) for n in notes} == {queued_id, running_id}
        # The worker's late report about a cancelled job is refused.
        assert not jobs.complete(conn, running, result_sha256=None, exit_code=0, actor=actor)
        assert jobs.cancel(conn, [queued_id], ACTOR) == []
        assert sorted(jobs.requeue(conn, [queued_id, running_id], ACTOR)) == [queued_id, running_id]
        assert {j.status for j in jobs.get_jobs(conn, [queued_id, running_id]).values()} == {"queued"}


def test_release_gives_back_without_burning_a_try(conn):
    job_id = _queued(conn, max_attempts=1)
    actor = _worker(conn)
    job = _claim(conn, actor)
    assert jobs.release(conn, job, reason="shutdown", actor=actor)
    again = jobs.get_job(conn, job_id)
    assert again.status == "queued" and again.tries == 0 and again.attempt == 1


def test_store_round_trip_and_dedup(conn):
    payload = os.urandom(3 * store.CHUNK_SIZE + 17)
    sha = hashlib.sha256(payload).hexdigest()
    for _ in range(2):
        writer = store.Upload(conn, store.DATABASE)
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i : i + 100_000])
        assert writer.seal(sha, len(payload)) == sha
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1
    assert conn.execute("SELECT max(length(data)) FROM binary_data").fetchone()[0] <= store.CHUNK_SIZE
    out = io.BytesIO()
    assert store.fetch(conn, store.DATABASE, sha, out) == len(payload)
    assert out.getvalue() == payload
    with pytest.raises(store.BlobMissing):
        store.fetch(conn, store.DATABASE, "0" * 64, io.BytesIO())


def test_notify_on_queued(db_url):
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url, autocommit=True) as conn:
        workers.listen(listener)
        _queued(conn)
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert got and got[0].channel == workers.CHANNEL
