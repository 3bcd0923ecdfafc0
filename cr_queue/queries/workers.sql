-- What a worker says about itself (wrappers: cr_queue/queries/workers.py).
--
-- A live worker holds a session advisory lock on its own id (the liveness
-- lock, on its heartbeat connection) and beats every few seconds; the rescue
-- sweep of jobs.sql takes jobs only from workers that lost both.  Idle
-- workers that claim the same kind of jobs share a wake token (another
-- advisory lock): only its holder LISTENs for new jobs.

-- name: register_worker
-- Add a starting worker to the workers table; returns its id.
INSERT INTO workers (name, host, pid, version, jobs, threads, groups, solvers)
VALUES (%(name)s, %(host)s, %(pid)s, %(version)s, %(jobs)s, %(threads)s, %(groups)s, %(solvers)s)
RETURNING id;

-- name: beat
-- The worker's heartbeat (draining when it is stopping); returns an admin's request and its node's settings.
WITH w AS (
    UPDATE workers
    SET last_heartbeat = now(),
        state = CASE WHEN %(draining)s AND state = 'running' THEN 'draining' ELSE state END
    WHERE id = %(id)s
    RETURNING host, requested
)
SELECT w.requested, n.nice, n.cpus, n.threads, n.active
FROM w
LEFT JOIN node_settings n ON n.host = w.host;

-- name: stop_worker
-- Record that a worker stopped, and why.
UPDATE workers
SET state = 'stopped', datetime_stopped = now(), stop_reason = %(reason)s
WHERE id = %(id)s;

-- name: hold_worker_lock
-- Take the liveness lock (lock_namespace, worker id) for as long as this session lives; false when another session holds it.
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
