-- What a worker says about itself (wrappers: cr_queue/queries/workers.py).
--
-- An idle worker holds one connection, its control connection, and on it
-- everything that keeps it known: the liveness lock (a session advisory lock
-- on its own id), the beat (which also renews the leases of the jobs it holds
-- and tries the rescue leader lock, in one statement), the claim polling for
-- its idle slots, LISTEN and the wake token.  The rescue sweep of jobs.sql
-- takes jobs only from workers that lost both the lock and a fresh beat.
-- Idle workers that claim the same kind of jobs share a wake token (another
-- advisory lock): only its holder LISTENs for new jobs.  One worker of the
-- fleet holds the rescue leader lock and sweeps; when its session ends the
-- lock frees and the next worker to beat takes it.
-- Through PgBouncer in transaction pooling (session state cannot be trusted)
-- no lock is taken and nothing is LISTENed: liveness rests on leases and beats.

-- name: register_worker
-- Add a starting worker to the workers table; returns its id.
INSERT INTO workers (name, host, pid, version, jobs, threads, groups, solvers)
VALUES (%(name)s, %(host)s, %(pid)s, %(version)s, %(jobs)s, %(threads)s, %(groups)s, %(solvers)s)
RETURNING id;

-- name: beat
-- The worker's heartbeat (draining when it is stopping), in one statement: renews the leases of the jobs it holds
-- (parallel arrays ids, attempts; not called when renew is false) and, with lead, tries the rescue leader lock.
-- Returns an admin's request, its node's settings, the ids still its own and whether it took the leader lock.
-- The lock is a session lock (leader_namespace, 0): taken here it stays until the session ends.
WITH w AS (
    UPDATE workers
    SET last_heartbeat = now(),
        state = CASE WHEN %(draining)s AND state = 'running' THEN 'draining' ELSE state END
    WHERE id = %(id)s
    RETURNING host, requested
)
SELECT w.requested, n.nice, n.cpus, n.threads, n.active,
       CASE WHEN %(renew)s THEN
           (SELECT coalesce(array_agg(r.id), '{}'::bigint[])
            FROM crh_renew(%(id)s::bigint, %(ids)s::bigint[], %(attempts)s::int[], %(lease_s)s::float8) AS r(id))
       END AS kept,
       CASE WHEN %(lead)s THEN pg_try_advisory_lock(%(leader_namespace)s::int, 0) END AS leader
FROM w
LEFT JOIN node_settings n ON n.host = w.host;

-- name: stop_worker
-- Record that a worker stopped, and why.
UPDATE workers
SET state = 'stopped', datetime_stopped = now(), stop_reason = %(reason)s
WHERE id = %(id)s;

-- name: hold_worker_lock
-- Take the liveness lock (lock_namespace, worker id) for as long as this session (the control connection) lives; false when another session holds it.
SELECT pg_try_advisory_lock(%(lock_namespace)s, %(worker_id)s::int);

-- name: take_wake_token
-- Try to become the idle worker woken for new jobs of this kind (key: a hash of its groups and solvers).
SELECT pg_try_advisory_lock(%(wake_namespace)s, %(key)s::int);

-- name: give_wake_token
-- Pass the wake token on (unlock it) once this worker has no idle slot.
SELECT pg_advisory_unlock(%(wake_namespace)s, %(key)s::int);

-- name: listen_jobs
-- Hear about new jobs: the trigger on inversions notifies crh_jobs with '<job id> <group>'.
LISTEN crh_jobs;

-- name: unlisten_jobs
-- Stop hearing about new jobs (the wake token was passed on).
UNLISTEN crh_jobs;

-- name: listen_cancel
-- Hear about cancelled jobs: cancel in jobs.sql notifies crh_cancel with the job id.
LISTEN crh_cancel;

-- name: listen_control
-- Hear an admin's drain or stop at once: request_workers in admin.sql notifies crh_worker_control with '<worker id> <request>'.
LISTEN crh_worker_control;

-- name: rescue_leader
-- Which session holds the rescue leader lock (leader_namespace, 0): its backend pid and application_name, for admins and tests.
SELECT a.pid, a.application_name
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(leader_namespace)s::int::oid AND l.objid = 0 AND l.objsubid = 2;
