-- The statements of `crh web` (cr_queue/web/): what its pages read, nothing it could write.
--
-- Every statement runs with the caller's own login, so row-level security decides what
-- it sees: a scientist's login sees its own jobs (and the whole queue only as anonymous
-- totals, crh_queue_counts()), an admin's or the owner's sees every job.  The status
-- queries of `crh status` (cr_queue/status.py) are reused for the rest of the overview.

-- name: session_facts
-- Who the web is logged in as, whether that login sees every job, and whether the
-- session is read-only (the pages show it; the tests check it).
SELECT current_user AS login,
       crh_privileged() AS privileged,
       current_setting('default_transaction_read_only') = 'on' AS read_only

-- name: by_state_and_group
-- The jobs this login sees, counted by group and state (one scan; the groups in name order,
-- jobs without a group first).
SELECT job_group AS "group", status, count(*) AS jobs
FROM inversions
GROUP BY job_group, status
ORDER BY job_group NULLS FIRST, status

-- name: hourly
-- The last 24 hours, hour by hour: jobs finished and failed in each hour, and the queue's
-- depth at the end of each, counted back from now (the jobs queued now, minus those that
-- entered the queue after that hour, plus those that left it after that hour; a job
-- requeued within the day counts once, so older hours are an estimate).  One pass over
-- the jobs that moved during the day.
WITH since AS (
    SELECT date_trunc('hour', now()) - interval '23 hours' AS start
), hours AS (
    SELECT generate_series(s.start, s.start + interval '23 hours', interval '1 hour') AS hour FROM since s
), moved AS (
    SELECT j.status, j.datetime_queued, j.datetime_started, j.datetime_finished
    FROM inversions j, since s
    WHERE j.datetime_queued >= s.start OR j.datetime_started >= s.start OR j.datetime_finished >= s.start
), moves AS (
    SELECT date_trunc('hour', m.at) AS hour,
           count(*) FILTER (WHERE m.kind = 'entered') AS entered,
           count(*) FILTER (WHERE m.kind = 'left') AS left_queue,
           count(*) FILTER (WHERE m.kind = 'finished') AS finished,
           count(*) FILTER (WHERE m.kind = 'failed') AS failed
    FROM moved j
    CROSS JOIN LATERAL (VALUES
        ('entered', j.datetime_queued),
        ('left', coalesce(j.datetime_started, CASE WHEN j.status = 'cancelled' THEN j.datetime_finished END)),
        (j.status, j.datetime_finished)
    ) AS m(kind, at), since s
    WHERE m.at >= s.start
    GROUP BY 1
), depth AS (
    SELECT count(*) AS queued FROM inversions WHERE status = 'queued'
)
SELECT h.hour,
       coalesce(m.finished, 0) AS finished,
       coalesce(m.failed, 0) AS failed,
       greatest(0, d.queued - coalesce(sum(m.entered - m.left_queue) OVER later, 0))::bigint AS queued
FROM hours h
LEFT JOIN moves m USING (hour)
CROSS JOIN depth d
WINDOW later AS (ORDER BY h.hour DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
ORDER BY h.hour

-- name: running_per_node
-- How many of the jobs this login sees run on each host (through ix_inversions_running).
SELECT coalesce(inv_computer, '?') AS host, count(*) AS running
FROM inversions
WHERE status = 'running'
GROUP BY 1
ORDER BY running DESC, host

-- name: running_by_worker
-- The running jobs this login sees, by the worker that holds them.
SELECT worker_id, array_agg(id ORDER BY id) AS jobs
FROM inversions
WHERE status = 'running' AND worker_id IS NOT NULL
GROUP BY worker_id

-- name: latest_jobs
-- The most recently added jobs this login sees, newest first (the primary key backwards).
SELECT id, status, sim_type, model_first, username, source_computer, source_path, job_group, sipdir,
       inv_computer AS host, failure_category, datetime_init AS added, datetime_finished AS finished
FROM inversions
ORDER BY id DESC
LIMIT %(limit)s

-- name: jobs_page
-- One page of the job list, newest first, after the filters a person chose (each filter is
-- off when its parameter is NULL; path matches anywhere in the tomodir's path), and `total`:
-- how many jobs the filters match in all.  The filters stand once, in `chosen`; NOT
-- MATERIALIZED lets each use of it be planned on its own, so the page stays a keyset read
-- by id (`before` is the last id of the previous page: page 1000 costs what page 1 does)
-- and only the count reads every matching job.  Always one row at least: on an empty page
-- the page's columns are NULL and `total` still says how many there are.
WITH chosen AS NOT MATERIALIZED (
    SELECT id, status, sim_type, model_first, username, source_computer, source_path, job_group, sipdir,
           inv_computer AS host, attempt, failure_category, failure_reason,
           datetime_init AS added, datetime_finished AS finished, downloaded
    FROM inversions
    WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
      AND (%(username)s::text IS NULL OR username = %(username)s::text)
      AND (%(group)s::text IS NULL OR job_group = %(group)s::text)
      AND (%(sipdir)s::text IS NULL OR sipdir = %(sipdir)s::text)
      AND (%(path)s::text IS NULL OR strpos(source_path, %(path)s::text) > 0)
)
SELECT page.*, counted.jobs AS total
FROM (SELECT count(*) AS jobs FROM chosen) AS counted
LEFT JOIN (
    SELECT *
    FROM chosen
    WHERE %(before)s::bigint IS NULL OR id < %(before)s::bigint
    ORDER BY id DESC
    LIMIT %(limit)s
) AS page ON true
ORDER BY page.id DESC

-- name: job_archives
-- What the pictures of one job are made from: its state and its two archives (none when
-- this login may not see the job).
SELECT id, status, sim_type, model_first, source_path, sipdir, input_sha256, result_sha256
FROM inversions
WHERE id = %(id)s

-- name: sipdir_jobs
-- The frequencies of one sipdir (its tomodirs on one computer), through ix_inversions_sipdir.
SELECT id, status, sim_type, model_first, username, source_computer, source_path, sipdir,
       input_sha256, result_sha256, failure_category, failure_reason, datetime_finished AS finished
FROM inversions
WHERE sipdir = %(sipdir)s AND source_computer = %(host)s
ORDER BY source_path, id
