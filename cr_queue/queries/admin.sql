-- The admin commands' statements: status, show, worker and node control, the
-- cleanup plan (wrappers: cr_queue/queries/admin.py).
--
-- Each answer is aggregated in SQL (never every row fetched into Python),
-- listings are bounded by %(limit)s, and each deletion is one set-based
-- statement.  What the status statements read is covered by indexes of
-- db/schema.py: totals by ix_inversions_status, running jobs by
-- ix_inversions_running, the queue by ix_inversions_claim, sipdirs by
-- ix_inversions_sipdir, a job's events by ix_events_job_id.
--
-- "--mine": the status statements take %(username)s and %(host)s; both NULL
-- means everyone's jobs, else only that user's jobs added from that computer.
-- The planner folds the NULL test away when it plans with the values (a custom
-- plan, as for a statement run once), so each plan is the one the statement
-- would have without the filter; a prepared statement keeps custom plans while
-- the generic one, which cannot fold it, costs more.

-- name: now
-- The database's clock, which every other time in the report is compared with.
SELECT now();

-- name: privileged
-- Whether the caller sees every job (admin, worker, table owner), or under row security only its own.
SELECT crh_privileged();

-- name: queue_counts
-- Every job in the queue as anonymous counts by status and group: how a user's status shows others' jobs.
SELECT status, job_group AS "group", jobs FROM crh_queue_counts();

-- name: totals
-- How many jobs are in each state, read from ix_inversions_status alone when everyone's (an index-only scan).
SELECT status, count(*) AS jobs
FROM inversions
WHERE %(username)s::text IS NULL OR (username = %(username)s AND source_computer = %(host)s)
GROUP BY status;

-- name: running_jobs
-- The running jobs, longest running first, with their workers.
SELECT j.id, j.username, j.source_computer, j.source_path, j.sipdir, j.job_group, j.sim_type, j.threads,
       j.attempt, j.tries, j.max_attempts, j.worker_id, w.name AS worker, coalesce(w.host, j.inv_computer) AS host,
       j.datetime_started AS started, extract(epoch FROM now() - j.datetime_started)::float8 AS elapsed_s,
       j.lease_expires
FROM inversions j
LEFT JOIN workers w ON w.id = j.worker_id
WHERE j.status = 'running'
  AND (%(username)s::text IS NULL OR (j.username = %(username)s AND j.source_computer = %(host)s))
ORDER BY j.datetime_started, j.id
LIMIT %(limit)s;

-- name: failed_jobs
-- The failed jobs not yet retrieved, most recent first, with why they failed.
SELECT j.id, j.username, j.source_computer, j.source_path, j.sipdir, j.job_group, j.sim_type, j.attempt,
       j.inv_computer AS host, j.exit_code, j.failure_category, j.failure_reason, j.datetime_finished AS finished
FROM inversions j
WHERE j.status = 'failed' AND NOT j.downloaded
  AND (%(username)s::text IS NULL OR (j.username = %(username)s AND j.source_computer = %(host)s))
ORDER BY j.datetime_finished DESC NULLS LAST, j.id DESC
LIMIT %(limit)s;

-- name: failure_categories
-- How many failed jobs not yet retrieved there are of each failure category.
SELECT coalesce(failure_category, 'unknown') AS category, count(*) AS jobs
FROM inversions
WHERE status = 'failed' AND NOT downloaded
  AND (%(username)s::text IS NULL OR (username = %(username)s AND source_computer = %(host)s))
GROUP BY 1
ORDER BY jobs DESC, category;

-- name: queue_depth
-- Queued and running jobs per login and group, with the top priority and the oldest waiting job.
-- Grouped by login (db_role, filled in by the database), the unit of fair share: the
-- username column is informational, whatever the client wrote; the key stays "username".
SELECT db_role AS username, job_group AS "group",
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'running') AS running,
       max(priority) FILTER (WHERE status = 'queued') AS top_priority,
       min(datetime_queued) FILTER (WHERE status = 'queued') AS oldest_queued
FROM inversions
WHERE status IN ('queued', 'running')
  AND (%(username)s::text IS NULL OR (username = %(username)s AND source_computer = %(host)s))
GROUP BY db_role, job_group
ORDER BY queued DESC, running DESC, db_role, job_group NULLS FIRST;

-- name: sipdirs
-- The most recently added sipdirs that still have a frequency to retrieve, each with its jobs counted by state.
WITH active AS (
    -- A sipdir is of interest while one of its frequencies can still be retrieved.
    -- The most recent are chosen first from the few columns that say so, then
    -- only their jobs are counted (through ix_inversions_sipdir).
    SELECT sipdir, source_computer, max(datetime_init) AS added
    FROM inversions
    WHERE sipdir IS NOT NULL AND NOT downloaded AND status <> 'cancelled'
      AND (%(username)s::text IS NULL OR (username = %(username)s AND source_computer = %(host)s))
    GROUP BY sipdir, source_computer
), top AS (
    SELECT sipdir, source_computer, added, count(*) OVER () AS listed_of
    FROM active
    ORDER BY added DESC, sipdir
    LIMIT %(limit)s
)
SELECT t.sipdir, t.source_computer, min(j.username) AS username,
       count(*) AS total,
       count(*) FILTER (WHERE j.status = 'finished') AS finished,
       count(*) FILTER (WHERE j.status = 'failed') AS failed,
       count(*) FILTER (WHERE j.status = 'running') AS running,
       count(*) FILTER (WHERE j.status IN ('registering', 'queued')) AS queued,
       count(*) FILTER (WHERE j.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE j.downloaded) AS retrieved,
       max(t.added) AS added,
       max(t.listed_of) AS listed_of
FROM top t
JOIN inversions j ON j.sipdir = t.sipdir AND j.source_computer = t.source_computer
WHERE %(username)s::text IS NULL OR (j.username = %(username)s AND j.source_computer = %(host)s)
GROUP BY t.sipdir, t.source_computer
ORDER BY max(t.added) DESC, t.sipdir;

-- name: workers
-- The workers not stopped or stopped within the hour (every one with include_stopped), 'lost' when their heartbeat is older than stale_s,
-- or as the rescue sweep judges them (jobs.sql rescue): heartbeat older than grace_s and nobody holds the worker's liveness lock.
SELECT w.id, w.name, w.host, w.pid, w.version, w.db_role,
       CASE WHEN w.state <> 'stopped'
                 AND (w.last_heartbeat < now() - make_interval(secs => %(stale_s)s)
                      OR (w.last_heartbeat < now() - make_interval(secs => %(grace_s)s)
                          AND pg_postmaster_start_time() < now() - make_interval(secs => %(grace_s)s)
                          AND NOT EXISTS (
                              SELECT 1 FROM pg_locks l
                              WHERE l.locktype = 'advisory' AND l.granted
                                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                AND l.classid = %(lock_namespace)s::int::oid AND l.objid::bigint = w.id
                                AND l.objsubid = 2)))
            THEN 'lost' ELSE w.state END AS state,
       w.requested, w.jobs, w.threads,
       -- A CPU budget column may be added later; read it without naming it so this keeps working.
       (to_jsonb(w) ->> 'cpus')::int AS cpus,
       w.groups, w.solvers, w.datetime_started AS started, w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat)::float8 AS heartbeat_age_s,
       w.datetime_stopped AS stopped, w.stop_reason,
       (SELECT count(*) FROM inversions j WHERE j.status = 'running' AND j.worker_id = w.id) AS held
FROM workers w
WHERE %(include_stopped)s OR w.state <> 'stopped' OR w.datetime_stopped > now() - interval '1 hour'
ORDER BY w.state = 'stopped', w.host, w.name, w.id
LIMIT %(limit)s;

-- name: worker_counts
-- How many workers are not stopped, and how many are.
SELECT count(*) FILTER (WHERE state <> 'stopped') AS not_stopped,
       count(*) FILTER (WHERE state = 'stopped') AS stopped
FROM workers;

-- name: recent_runtime
-- The median runtime of the most recent finished jobs (at most sample of them, of the last 7 days).
WITH RECURSIVE hosts AS (
    -- The newest are found per host through ix_inversions_finished (inv_computer,
    -- datetime_finished): a loose index scan lists the hosts, then each host's
    -- newest jobs are read backwards.
    SELECT min(inv_computer) AS host FROM inversions
    UNION ALL
    SELECT (SELECT min(inv_computer) FROM inversions WHERE inv_computer > hosts.host)
    FROM hosts
    WHERE hosts.host IS NOT NULL
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY runtime_s) AS median_s, count(*) AS sample
FROM (
    SELECT r.runtime_s
    FROM hosts CROSS JOIN LATERAL (
        SELECT j.datetime_finished, extract(epoch FROM j.datetime_finished - j.datetime_started)::float8 AS runtime_s
        FROM inversions j
        WHERE j.inv_computer = hosts.host AND j.status = 'finished' AND j.datetime_started IS NOT NULL
          AND j.datetime_finished > now() - interval '7 days'
        ORDER BY j.datetime_finished DESC
        LIMIT %(sample)s
    ) r
    WHERE hosts.host IS NOT NULL
    ORDER BY r.datetime_finished DESC
    LIMIT %(sample)s
) recent;

-- name: job_states
-- The state of many jobs by id in one query (the tree mode of status).
SELECT id, status, downloaded, sim_type, attempt, inv_computer, failure_category, failure_reason,
       sipdir, datetime_finished AS finished
FROM inversions
WHERE id = ANY(%(ids)s::bigint[]);

-- name: show_jobs
-- Every column of these jobs, with their worker and the sizes of their archives (crh show).
SELECT j.*, w.name AS worker_name, w.host AS worker_host,
       bi.size AS input_size, br.size AS result_size
FROM inversions j
LEFT JOIN workers w ON w.id = j.worker_id
LEFT JOIN blobs bi ON bi.sha256 = j.input_sha256
LEFT JOIN blobs br ON br.sha256 = j.result_sha256
WHERE j.id = ANY(%(ids)s::bigint[])
ORDER BY j.id;

-- name: show_events
-- The whole history of these jobs, with the names of the workers involved (crh show).
SELECT e.job_id, e.id, e.datetime, e.event, e.status, e.attempt, e.db_role, e.os_user, e.host, e.pid,
       e.worker_id, w.name AS worker_name, e.detail
FROM events e
LEFT JOIN workers w ON w.id = e.worker_id
WHERE e.job_id = ANY(%(ids)s::bigint[])
ORDER BY e.job_id, e.id;

-- name: find_workers
-- The workers named by id, by name or by host.
SELECT w.id, w.name, w.host, w.pid, w.state, w.requested,
       extract(epoch FROM now() - w.last_heartbeat)::float8 AS heartbeat_age_s
FROM workers w
WHERE w.id = ANY(%(ids)s::bigint[]) OR w.name = ANY(%(names)s::text[]) OR w.host = ANY(%(hosts)s::text[])
ORDER BY w.id;

-- name: request_workers
-- Ask workers to 'drain' or 'stop'; they read it at their next beat, and at once from a NOTIFY on crh_worker_control.
UPDATE workers
SET requested = %(request)s
WHERE id = ANY(%(ids)s::bigint[]) AND state <> 'stopped'
  -- 'stop' overrides an earlier 'drain'; 'drain' never softens an earlier 'stop'.
  AND (requested IS NULL OR requested = %(request)s OR %(request)s = 'stop')
RETURNING id, name, host, requested, pg_notify('crh_worker_control', id::text || ' ' || %(request)s);

-- name: node_set
-- Create or change a host's settings; a value changes only where its set_ flag says so (active: where not NULL).
INSERT INTO node_settings AS n (host, nice, cpus, threads, active, datetime_updated)
VALUES (%(host)s, %(nice)s, %(cpus)s, %(threads)s, coalesce(%(active)s, true), now())
ON CONFLICT (host) DO UPDATE SET
    nice = CASE WHEN %(set_nice)s THEN EXCLUDED.nice ELSE n.nice END,
    cpus = CASE WHEN %(set_cpus)s THEN EXCLUDED.cpus ELSE n.cpus END,
    threads = CASE WHEN %(set_threads)s THEN EXCLUDED.threads ELSE n.threads END,
    active = coalesce(%(active)s, n.active),
    datetime_updated = now()
RETURNING host, nice, cpus, threads, active, datetime_updated AS updated;

-- name: node_clear
-- Forget some of a host's settings (those whose clear_ flag is true).
UPDATE node_settings
SET nice = CASE WHEN %(clear_nice)s THEN NULL ELSE nice END,
    cpus = CASE WHEN %(clear_cpus)s THEN NULL ELSE cpus END,
    threads = CASE WHEN %(clear_threads)s THEN NULL ELSE threads END,
    datetime_updated = now()
WHERE host = %(host)s
RETURNING host, nice, cpus, threads, active, datetime_updated AS updated;

-- name: node_delete
-- Forget a host's settings altogether.
DELETE FROM node_settings WHERE host = %(host)s RETURNING host;

-- name: node_list
-- Every host's settings, with how many live workers it has (heartbeat within stale_s).
SELECT n.host, n.nice, n.cpus, n.threads, n.active, n.datetime_updated AS updated,
       (SELECT count(*) FROM workers w
        WHERE w.host = n.host AND w.state <> 'stopped'
          AND w.last_heartbeat >= now() - make_interval(secs => %(stale_s)s)) AS live_workers
FROM node_settings n
ORDER BY n.host;

-- name: stuck_registering
-- Jobs an interrupted crh_add left in 'registering' for longer than stuck_s.
SELECT id, status, username, source_computer, source_path, crh_file, datetime_init AS since,
       input_sha256, result_sha256
FROM inversions
WHERE status = 'registering' AND datetime_init < now() - make_interval(secs => %(stuck_s)s)
ORDER BY id;

-- name: expired
-- Ended jobs never retrieved within the retention (retention_days after they ended).
SELECT id, status, username, source_computer, source_path, crh_file, datetime_finished AS since,
       input_sha256, result_sha256
FROM inversions
WHERE status IN ('finished', 'failed', 'cancelled') AND NOT downloaded
  AND datetime_finished < now() - (%(retention_days)s * interval '1 day')
ORDER BY id;

-- name: expiring
-- Ended jobs not yet retrieved whose retention runs out within the next week: the warning before the purge.
SELECT id, status, username, source_computer, source_path, crh_file, datetime_finished AS since,
       datetime_finished + (%(retention_days)s * interval '1 day') AS purge_after
FROM inversions
WHERE status IN ('finished', 'failed', 'cancelled') AND NOT downloaded
  AND datetime_finished >= now() - (%(retention_days)s * interval '1 day')
  AND datetime_finished < now() - (%(retention_days)s * interval '1 day') + interval '7 days'
ORDER BY datetime_finished, id;

-- name: crh_candidates
-- The jobs of one computer, not yet retrieved, whose .crh files cleanup checks on disk.
SELECT id, status, username, source_computer, source_path, crh_file, datetime_init AS since,
       input_sha256, result_sha256
FROM inversions
-- Not while a worker runs the job, nor while crh_add is still writing it (stuck registrations have their own rule).
WHERE source_computer = %(host)s AND NOT downloaded AND status IN ('queued', 'finished', 'failed', 'cancelled')
ORDER BY id;

-- name: retrieved_to_purge
-- Retrieved jobs whose archives are still stored, retrieved more than keep_s seconds ago: their archives are purged, their rows and events stay.
SELECT id, status, username, source_computer, source_path, crh_file, datetime_downloaded AS since,
       input_sha256, result_sha256
FROM inversions
WHERE downloaded AND datetime_purged IS NULL AND status IN ('finished', 'failed', 'cancelled')
  AND (input_sha256 IS NOT NULL OR result_sha256 IS NOT NULL)
  AND datetime_downloaded <= now() - make_interval(secs => %(keep_s)s)
ORDER BY id;

-- name: purge_archives
-- Let go of the archives of the planned retrieved jobs, each checked again (retrieved, not purged, past keep_s):
-- the job keeps its row, marked with the time of the purge, and an event 'purged' records the hashes let go.
-- crh_purge_archives (migration 0006, 0006_retention.sql) does it for admins and the owner.
SELECT id, input_sha256, result_sha256
FROM crh_purge_archives(%(ids)s::bigint[], %(keep_s)s::float8, %(os_user)s::text, %(host)s::text, %(pid)s::int,
                        %(detail)s::jsonb);

-- name: delete_jobs
-- Delete the planned jobs (parallel arrays ids, reasons), each checked again against the rule that chose it.
DELETE FROM inversions j
USING unnest(%(ids)s::bigint[], %(reasons)s::text[]) AS p(id, reason)
-- A job retrieved, claimed or completed since the plan is kept.  Events go with
-- their jobs (ON DELETE CASCADE); the archives they release go by blobs.sql's garbage.
WHERE j.id = p.id AND (
    (p.reason = 'stuck_registering' AND j.status = 'registering'
        AND j.datetime_init < now() - make_interval(secs => %(stuck_s)s))
    OR (p.reason = 'expired' AND j.status IN ('finished', 'failed', 'cancelled') AND NOT j.downloaded
        AND j.datetime_finished < now() - (%(retention_days)s * interval '1 day'))
    OR (p.reason = 'crh_missing' AND j.status IN ('queued', 'finished', 'failed', 'cancelled') AND NOT j.downloaded
        AND j.source_computer = %(host)s)
)
RETURNING j.id, j.input_sha256, j.result_sha256;

-- name: store_size
-- The bytes the archive and job tables take on disk, indexes and TOAST included.
SELECT pg_total_relation_size('binary_data') AS binary_data, pg_total_relation_size('blobs') AS blobs,
       pg_total_relation_size('inversions') AS inversions, pg_total_relation_size('events') AS events;
