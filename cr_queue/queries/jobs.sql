-- The life of a job, one statement per step (wrappers: cr_queue/queries/jobs.py).
--
-- Every statement that changes a job's state writes its event row in the same
-- statement (the CTE "e"), so the history can never disagree with the state.
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
-- Take over a 'registering' row found by reuse_registering with this crh_add's settings.
UPDATE inversions
SET sim_type = %(sim_type)s, model_first = %(model_first)s, username = %(username)s, crh_file = %(crh_file)s,
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
WITH req AS MATERIALIZED (
    -- A new job's rank: after its user's last waiting job, but never behind the
    -- front of the queue, so a user who adds 10 jobs behind another's 5,000 is
    -- served in turns with them rather than after them (a user's jobs of one
    -- batch get consecutive ranks).  The front comes from crh_queue_front():
    -- with per-user roles, row security hides others' jobs.
    SELECT r.id, r.sha256, r.ord, j.username
    FROM unnest(%(ids)s::bigint[], %(shas)s::text[]) WITH ORDINALITY AS r(id, sha256, ord)
    JOIN inversions j ON j.id = r.id AND j.status = 'registering'
), front AS MATERIALIZED (
    SELECT crh_queue_front() - 1 AS rank
), base AS MATERIALIZED (
    SELECT username, greatest(
        (SELECT max(fair_rank) FROM inversions WHERE status = 'queued' AND username = users.username),
        (SELECT rank FROM front),
        0) AS rank
    FROM (SELECT DISTINCT username FROM req) users
), rank AS MATERIALIZED (
    SELECT req.id, req.sha256,
           base.rank + row_number() OVER (PARTITION BY req.username ORDER BY req.ord) AS fair_rank
    FROM req JOIN base USING (username)
), u AS (
    UPDATE inversions
    SET status = 'queued', input_sha256 = r.sha256, datetime_queued = now(), fair_rank = r.fair_rank
    FROM rank r
    WHERE inversions.id = r.id AND inversions.status = 'registering'
    RETURNING inversions.id, inversions.status, inversions.attempt, inversions.input_sha256
), e AS (
    -- Each event's detail names the archive.
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'queued', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s,
           jsonb_build_object('sha256', u.input_sha256)
    FROM u
)
SELECT id FROM u;

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
DELETE FROM inversions WHERE id = %(id)s AND status = 'registering';

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
WITH next AS (
    -- Best: highest priority, then fair-share rank (users in turns), then id; the
    -- plan walks ix_inversions_claim.  SKIP LOCKED passes over the row another
    -- claimer is taking.
    SELECT id FROM inversions
    WHERE status = 'queued'
      AND ((sim_type = 'mod' AND %(can_mod)s)
           OR (sim_type = 'inv' AND %(can_inv)s AND (NOT model_first OR %(can_mod)s)))
      AND (CASE WHEN cardinality(%(groups)s::text[]) = 0 THEN job_group IS NULL
                ELSE job_group = ANY(%(groups)s::text[]) END)
      AND (%(max_threads)s::int IS NULL OR threads <= %(max_threads)s::int)
      -- Jobs this worker gave back after a node failure moments ago go to another worker first.
      AND NOT (id = ANY(%(avoid)s::bigint[]))
    ORDER BY priority DESC, fair_rank, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), u AS (
    -- A claim starts a new attempt (the fencing number every later write of
    -- this worker names) and counts a try against max_attempts.
    UPDATE inversions j
    SET status = 'running', attempt = j.attempt + 1, tries = j.tries + 1,
        worker_id = %(worker_id)s, inv_computer = %(host)s, datetime_started = now(),
        lease_expires = now() + make_interval(secs => %(lease_s)s),
        exit_code = NULL, failure_category = NULL, failure_reason = NULL
    FROM next
    WHERE j.id = next.id
    RETURNING j.id, j.status, j.sim_type, j.model_first, j.username, j.source_computer, j.source_path,
              j.crh_file, j.priority, j.job_group, j.sipdir, j.threads, j.timeout_s, j.attempt, j.tries,
              j.max_attempts, j.worker_id, j.inv_computer, j.input_sha256, j.result_sha256, j.exit_code,
              j.failure_category, j.failure_reason, j.datetime_init, j.datetime_started, j.datetime_finished,
              j.downloaded
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'claimed', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT * FROM u;

-- name: renew
-- Extend the leases of the jobs a worker holds (parallel arrays ids, attempts); returns the ids still its own.
UPDATE inversions j SET lease_expires = now() + make_interval(secs => %(lease_s)s)
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS held(id, attempt)
WHERE j.id = held.id AND j.attempt = held.attempt AND j.status = 'running' AND j.worker_id = %(worker_id)s
RETURNING j.id;

-- name: complete
-- Mark the worker's current attempt of a job finished, with its result; no row when the attempt is stale.
WITH u AS (
    UPDATE inversions
    SET status = 'finished', result_sha256 = %(result_sha256)s, exit_code = %(exit_code)s,
        datetime_finished = now(), lease_expires = NULL
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'finished', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: fail
-- Mark the worker's current attempt of a job failed by its solver, saying why; no row when the attempt is stale.
WITH u AS (
    UPDATE inversions
    SET status = 'failed', result_sha256 = %(result_sha256)s, exit_code = %(exit_code)s,
        failure_category = %(category)s, failure_reason = %(reason)s,
        datetime_finished = now(), lease_expires = NULL
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'failed', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: release
-- Give the worker's current attempt of a job back to the queue without counting its try (shutdown, broken node).
WITH u AS (
    UPDATE inversions
    SET status = 'queued', tries = greatest(tries - 1, 0), worker_id = NULL, lease_expires = NULL,
        datetime_queued = now()
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'released', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: own_outcome
-- Whether this worker's attempt already ended as status with this result (a retried write whose answer was lost).
SELECT EXISTS (
    SELECT 1 FROM inversions
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = %(status)s AND worker_id = %(worker_id)s
      AND result_sha256 IS NOT DISTINCT FROM %(result_sha256)s
);

-- name: rescue
-- Return running jobs whose worker is gone to the queue, or fail those out of tries, in one statement.
WITH lost AS (
    -- Gone: the lease ran out, or both signals of a live worker are missing: its
    -- heartbeat is older than grace_s and nobody holds its liveness lock (the
    -- advisory lock (lock_namespace, worker id) of its heartbeat connection).
    -- Just after a server restart (which drops every lock) only leases count.
    -- A worker that has not beaten since the server started gets restart_grace_s
    -- after the start to reconnect and renew (longer than the cap of its
    -- reconnection backoff, cr_queue/worker/reconnect.py): its leases ran on
    -- while the server was down, and nobody could tell it anything then.
    SELECT j.id
    FROM inversions j
    LEFT JOIN workers w ON w.id = j.worker_id
    WHERE j.status = 'running'
      AND NOT (coalesce(w.last_heartbeat < pg_postmaster_start_time(), false)
               AND pg_postmaster_start_time() > now() - make_interval(secs => %(restart_grace_s)s))
      AND (j.lease_expires < now()
           OR (coalesce(w.last_heartbeat < now() - make_interval(secs => %(grace_s)s), true)
               AND pg_postmaster_start_time() < now() - make_interval(secs => %(grace_s)s)
               AND NOT EXISTS (
                   SELECT 1 FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND l.classid = %(lock_namespace)s::int::oid AND l.objid::bigint = j.worker_id
                     AND l.objsubid = 2)))
    FOR UPDATE OF j SKIP LOCKED
), u AS (
    UPDATE inversions j
    SET status = CASE WHEN j.tries >= j.max_attempts THEN 'failed' ELSE 'queued' END,
        failure_category = CASE WHEN j.tries >= j.max_attempts THEN 'lost_worker' END,
        failure_reason = CASE WHEN j.tries >= j.max_attempts
            THEN 'its worker was lost on each of its ' || j.tries || ' tries' END,
        datetime_finished = CASE WHEN j.tries >= j.max_attempts THEN now() END,
        datetime_queued = now(), worker_id = NULL, lease_expires = NULL
    FROM lost
    WHERE j.id = lost.id
    RETURNING j.id, j.status, j.attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'rescued', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id, status FROM u;

-- name: cancel
-- Cancel jobs not yet ended; a NOTIFY on crh_cancel tells the worker of a running one to stop its solver.
WITH u AS (
    UPDATE inversions
    SET status = 'cancelled', datetime_finished = now(), lease_expires = NULL
    WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('registering', 'queued', 'running')
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'cancelled', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id, pg_notify('crh_cancel', id::text) FROM u;

-- name: requeue
-- Send failed or cancelled jobs (not yet retrieved) to the queue again, with all their tries back.
WITH u AS (
    UPDATE inversions
    SET status = 'queued', tries = 0, exit_code = NULL, failure_category = NULL, failure_reason = NULL,
        result_sha256 = NULL, datetime_finished = NULL, datetime_queued = now(), worker_id = NULL,
        lease_expires = NULL
    WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('failed', 'cancelled') AND NOT downloaded
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'requeued', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: failed_of
-- A user's failed, not yet retrieved jobs added from one computer (what `crh requeue --failed` takes).
SELECT id FROM inversions
WHERE status = 'failed' AND NOT downloaded AND username = %(username)s AND source_computer = %(source_computer)s
ORDER BY id;

-- name: set_priority
-- Change the priority of jobs not yet ended.
WITH u AS (
    UPDATE inversions
    SET priority = %(priority)s
    WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('registering', 'queued', 'running')
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'priority', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: mark_downloaded
-- Record that the results of ended jobs were brought back (the status stays, as in cr_hydra).
WITH u AS (
    UPDATE inversions
    SET downloaded = true, datetime_downloaded = now()
    WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('finished', 'failed')
    RETURNING id, status, attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, 'downloaded', u.status, u.attempt, %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id FROM u;

-- name: count_claimable
-- How many jobs wait in the queue.
SELECT count(*) FROM inversions WHERE status = 'queued';

-- name: count_pending
-- How many of these jobs have not ended yet.
SELECT count(*) FROM inversions
WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('registering', 'queued', 'running');

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
-- Give a job back after a node failure, or fail it as node_failures once max_nodes distinct workers (this one included) have.
WITH j AS (
    SELECT id FROM inversions
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND worker_id = %(worker_id)s
    FOR UPDATE
), earlier AS (
    -- The history is the events: each node-failure release names its worker, host and reason.
    SELECT DISTINCT ON (e.worker_id) e.worker_id, e.host, e.detail ->> 'reason' AS reason
    FROM events e JOIN j ON e.job_id = j.id
    WHERE e.event = 'released' AND e.detail ? 'node_failure' AND e.worker_id IS DISTINCT FROM %(worker_id)s
    ORDER BY e.worker_id, e.id DESC
), nodes AS (
    SELECT worker_id, host, reason FROM earlier
    UNION ALL
    SELECT %(worker_id)s, %(host)s, %(reason)s
), verdict AS (
    SELECT count(*) >= %(max_nodes)s AS give_up,
           'given back by ' || count(*) || ' workers, each unable to run it: '
           || string_agg(coalesce(w.name, 'worker ' || n.worker_id) || ' on ' || n.host || ' (' || n.reason || ')',
                         '; ' ORDER BY n.worker_id) AS story
    FROM nodes n LEFT JOIN workers w ON w.id = n.worker_id
), u AS (
    UPDATE inversions i
    SET status = CASE WHEN v.give_up THEN 'failed' ELSE 'queued' END,
        tries = CASE WHEN v.give_up THEN i.tries ELSE greatest(i.tries - 1, 0) END,
        failure_category = CASE WHEN v.give_up THEN 'node_failures' END,
        failure_reason = CASE WHEN v.give_up THEN v.story END,
        datetime_finished = CASE WHEN v.give_up THEN now() END,
        datetime_queued = CASE WHEN v.give_up THEN i.datetime_queued ELSE now() END,
        worker_id = CASE WHEN v.give_up THEN i.worker_id END,
        lease_expires = NULL
    FROM j, verdict v
    WHERE i.id = j.id
    RETURNING i.id, i.status, i.attempt
), e AS (
    INSERT INTO events (job_id, event, status, attempt, os_user, host, pid, worker_id, detail)
    SELECT u.id, CASE WHEN u.status = 'failed' THEN 'failed' ELSE 'released' END, u.status, u.attempt,
           %(os_user)s, %(host)s, %(pid)s, %(worker_id)s, %(detail)s
    FROM u
)
SELECT id, status FROM u;
