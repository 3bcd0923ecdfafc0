-- The life of a job, one statement per step (wrappers: cr_queue/queries/jobs.py).
--
-- Every statement that changes a job's state calls a function of the database
-- (migration 0005) that checks the caller, the transition and the fence, and
-- writes its event row in the same statement, so the history can never
-- disagree with the state and psql cannot go around it.
-- A worker's writes about a job name the attempt it holds (fencing): a write
-- for an attempt that is no longer current changes nothing, and the caller
-- learns it was refused because no row comes back.
--
-- Parameters are psycopg's %(name)s placeholders.  The actor's are the same
-- everywhere: os_user, host, pid, worker_id (NULL but for a worker) and detail
-- (a jsonb object); the database adds its own role to each event.

-- name: reuse_registering
-- Lock the row an interrupted crh_add left in 'registering' for the same directory, if there is one.
SELECT id FROM inversions
WHERE status = 'registering' AND source_computer = %(source_computer)s AND source_path = %(source_path)s
ORDER BY id LIMIT 1
FOR UPDATE;

-- name: update_registering
-- Take over a 'registering' row found by reuse_registering with this crh_add's settings (its username stays as registered).
UPDATE inversions
SET sim_type = %(sim_type)s, model_first = %(model_first)s, crh_file = %(crh_file)s,
    priority = %(priority)s, job_group = %(job_group)s, threads = %(threads)s, timeout_s = %(timeout_s)s,
    max_attempts = %(max_attempts)s, sipdir = %(sipdir)s, datetime_init = now()
WHERE id = %(id)s;

-- name: insert_registering
-- Create a job in 'registering', where no worker can see it, with its 'registering' event.
WITH u AS (
    INSERT INTO inversions (status, sim_type, model_first, username, source_computer, source_path,
                            crh_file, priority, job_group, threads, timeout_s, max_attempts, sipdir)
    VALUES ('registering', %(sim_type)s, %(model_first)s, %(username)s, %(source_computer)s,
            %(source_path)s, %(crh_file)s, %(priority)s, %(job_group)s, %(threads)s, %(timeout_s)s,
            %(max_attempts)s, %(sipdir)s)
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'registering', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: finish_registrations
-- Make registered jobs (parallel arrays ids, shas) claimable in the batch's order, each with its archive and fair-share rank.
-- The database does it (migration 0005): it checks each archive is the job owner's, ranks
-- each job after its login's last waiting one but never behind the queue's front (users
-- take turns), and writes the 'queued' events.
SELECT id FROM crh_finish_registrations(%(ids)s::bigint[], %(shas)s::text[], %(os_user)s::text, %(host)s::text, %(pid)s::int) AS id;

-- name: find_duplicates
-- For each new job (parallel arrays ids, paths, shas): a waiting or running job with the same content from the same directory.
SELECT r.job_id, (
    SELECT j.id FROM inversions j
    WHERE j.source_computer = %(source_computer)s AND j.source_path = r.source_path AND j.input_sha256 = r.sha256
      AND j.status IN ('queued', 'running') AND j.id <> r.job_id
    ORDER BY j.id LIMIT 1) AS duplicate
FROM unnest(%(ids)s::bigint[], %(paths)s::text[], %(shas)s::text[]) AS r(job_id, source_path, sha256);

-- name: drop_registration
-- Forget a registration that will not be completed (nobody could ever have claimed it).
DELETE FROM inversions WHERE id = %(id)s::bigint AND status = 'registering';

-- name: get_jobs
-- The jobs with these ids (those the caller may see), every column the Python Job carries.
SELECT j.id, j.status, j.sim_type, j.model_first, j.username, j.source_computer, j.source_path, j.crh_file,
       j.priority, j.job_group, j.sipdir, j.threads, j.timeout_s, j.attempt, j.tries, j.max_attempts,
       j.worker_id, j.inv_computer, j.input_sha256, j.result_sha256, j.exit_code, j.failure_category,
       j.failure_reason, j.datetime_init, j.datetime_started, j.datetime_finished, j.downloaded
FROM inversions j
WHERE j.id = ANY(%(ids)s::bigint[]);

-- name: events_of
-- A job's history, oldest first.
SELECT datetime, event, status, attempt, db_role, os_user, host, pid, worker_id, detail
FROM events
WHERE job_id = %(job_id)s
ORDER BY id;

-- name: claim
-- Take the best queued job this worker can run, in one short transaction, and record the claim.
-- crh_claim (migration 0005) checks the worker is the caller's own, takes the best job
-- (priority, fair-share rank, id; ix_inversions_claim, SKIP LOCKED), starts a new attempt
-- (the fence every later write names) and writes the 'claimed' event.  It passes over the
-- jobs in avoid: those this worker gave back after a node failure moments ago go to another first.
SELECT j.id, j.status, j.sim_type, j.model_first, j.username, j.source_computer, j.source_path,
       j.crh_file, j.priority, j.job_group, j.sipdir, j.threads, j.timeout_s, j.attempt, j.tries,
       j.max_attempts, j.worker_id, j.inv_computer, j.input_sha256, j.result_sha256, j.exit_code,
       j.failure_category, j.failure_reason, j.datetime_init, j.datetime_started, j.datetime_finished,
       j.downloaded
FROM crh_claim(%(worker_id)s::bigint, %(can_mod)s::boolean, %(can_inv)s::boolean, %(groups)s::text[], %(max_threads)s::int,
               %(avoid)s::bigint[], %(lease_s)s::float8, %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS j;

-- name: renew
-- Extend the leases of the jobs a worker holds (parallel arrays ids, attempts); returns the ids still its own.
SELECT id FROM crh_renew(%(worker_id)s::bigint, %(ids)s::bigint[], %(attempts)s::int[], %(lease_s)s::float8) AS id;

-- name: complete
-- Mark the worker's current attempt of a job finished, with its result; no row when the attempt is stale.
SELECT id FROM crh_complete(%(id)s::bigint, %(attempt)s::int, %(worker_id)s::bigint, %(result_sha256)s::text, %(exit_code)s::int,
                            %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: fail
-- Mark the worker's current attempt of a job failed by its solver, saying why; no row when the attempt is stale.
SELECT id FROM crh_fail(%(id)s::bigint, %(attempt)s::int, %(worker_id)s::bigint, %(result_sha256)s::text, %(exit_code)s::int, %(category)s::text,
                        %(reason)s::text, %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: release
-- Give the worker's current attempt of a job back to the queue without counting its try (shutdown, broken node).
SELECT id FROM crh_release(%(id)s::bigint, %(attempt)s::int, %(worker_id)s::bigint, %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: own_outcome
-- Whether this worker's attempt already ended as status with this result (a retried write whose answer was lost).
SELECT EXISTS (
    SELECT 1 FROM inversions
    WHERE id = %(id)s::bigint AND attempt = %(attempt)s::int AND status = %(status)s AND worker_id = %(worker_id)s::bigint
      AND result_sha256 IS NOT DISTINCT FROM %(result_sha256)s::text
);

-- name: rescue
-- Return running jobs whose worker is gone to the queue, or fail those out of tries, in one statement.
-- Gone (crh_rescue, migration 0005): the lease ran out, or both signals of a live worker are
-- missing: its heartbeat is older than grace_s and nobody holds its liveness lock (the
-- advisory lock (lock_namespace, worker id) of its control connection).
-- One worker of the fleet runs it every few seconds: the holder of the rescue leader lock (workers.sql beat).
-- Just after a server restart (which drops every lock) only leases count, and a worker that
-- has not beaten since the start gets restart_grace_s to reconnect and renew.
SELECT id, status FROM crh_rescue(%(grace_s)s::float8, %(restart_grace_s)s::float8, %(lock_namespace)s::int, %(worker_id)s::bigint,
                                  %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb);

-- name: cancel
-- Cancel jobs not yet ended; a NOTIFY on crh_cancel tells the worker of a running one to stop its solver.
SELECT id FROM crh_cancel(%(ids)s::bigint[], %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: requeue
-- Send failed or cancelled jobs (not yet retrieved) to the queue again, with all their tries back.
SELECT id FROM crh_requeue(%(ids)s::bigint[], %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: failed_of
-- A user's failed, not yet retrieved jobs added from one computer (what `crh requeue --failed` takes).
SELECT id FROM inversions
WHERE status = 'failed' AND NOT downloaded AND username = %(username)s AND source_computer = %(source_computer)s
ORDER BY id;

-- name: set_priority
-- Change the priority of jobs not yet ended.
SELECT id FROM crh_set_priority(%(ids)s::bigint[], %(priority)s::int, %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: mark_downloaded
-- Record that the results of ended jobs were brought back (the status stays, as in cr_hydra).
SELECT id FROM crh_mark_downloaded(%(ids)s::bigint[], %(os_user)s::text, %(host)s::text, %(pid)s::int, %(detail)s::jsonb) AS id;

-- name: count_claimable
-- How many jobs wait in the queue.
SELECT count(*) FROM inversions WHERE status = 'queued';

-- name: count_pending
-- How many of these jobs have not ended yet.
SELECT count(*) FROM inversions
WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('registering', 'queued', 'running');

-- name: try_locks
-- Take a session lock per key (crh_add: one per tomodir it registers; crh_retrieve: one per job it brings back); returns the keys another session holds.
-- The locks last until the command's connection ends, which a killed command's does too.
SELECT k.key FROM unnest(%(keys)s::bigint[]) AS k(key) WHERE NOT pg_try_advisory_lock(k.key);

-- name: lock_holders
-- Who holds these session locks (keys as in try_locks): each key with its session's application_name.
SELECT (l.classid::bigint << 32) | l.objid::bigint AS key, a.application_name
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND ((l.classid::bigint << 32) | l.objid::bigint) = ANY(%(keys)s::bigint[]);

-- name: registering_at
-- The jobs still 'registering' for these directories of one host (what an interrupted crh_add leaves for the next to resume).
SELECT id, source_path FROM inversions
WHERE status = 'registering' AND source_computer = %(host)s AND source_path = ANY(%(paths)s::text[])
ORDER BY id;

-- name: jobs_at
-- The jobs registered from these directories of one host, or from below them (what `crh show TOMODIR` finds once the .crh is gone with the retrieval), oldest first.
SELECT id FROM inversions
WHERE source_computer = %(host)s
  AND EXISTS (SELECT 1 FROM unnest(%(paths)s::text[]) AS p(path)
              WHERE source_path = p.path OR left(source_path, length(p.path) + 1) = p.path || '/')
ORDER BY id;

-- name: count_orphaned
-- How many running jobs have a worker that holds no liveness lock: the rescue sweep will return them soon.
SELECT count(*)
FROM inversions j
WHERE j.status = 'running'
  AND NOT EXISTS (
      SELECT 1 FROM pg_locks l
      WHERE l.locktype = 'advisory' AND l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = %(lock_namespace)s::int::oid AND l.objid::bigint = j.worker_id AND l.objsubid = 2);

-- name: release_node_failure
-- Give a job back after a node failure, or fail it as node_failures once max_nodes distinct nodes (this one included) have.
-- A node is a host and the scratch directory its worker names in detail ->> 'scratch'.
-- crh_release_node_failure (migrations 0005, 0007) reads the job's earlier node-failure releases from its events
-- (which a worker login may not read itself) and writes the 'released' or 'failed' event.
SELECT id, status FROM crh_release_node_failure(%(id)s::bigint, %(attempt)s::int, %(worker_id)s::bigint, %(reason)s::text,
                                                %(max_nodes)s::int, %(os_user)s::text, %(host)s::text, %(pid)s::int,
                                                %(detail)s::jsonb);
