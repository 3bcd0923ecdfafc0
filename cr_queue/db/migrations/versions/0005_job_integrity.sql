-- Migration 0005: the job's state machine lives in the database (read by 0005_job_integrity.py).
--
-- Users and workers change jobs only through the functions below (SECURITY
-- DEFINER, search_path pinned by pin_search_path), which check the caller, the
-- transition and the fence (worker login, worker id, attempt) and write the
-- event in the same statement.  Inside them current_user is the owner, so the
-- caller is session_user: the login that authenticated (SET ROLE cannot change it).

-- name: repair_finished_without_result
-- A finished job must have a result: one that has none (a forged finish) becomes failed, with an event saying why.
WITH u AS (
    UPDATE inversions
    SET status = 'failed', failure_category = 'no_result',
        failure_reason = 'marked finished without a result (found by migration 0005)', lease_expires = NULL
    WHERE status = 'finished' AND result_sha256 IS NULL
    RETURNING id, status, attempt
)
INSERT INTO events (job_id, event, status, attempt, detail)
SELECT u.id, 'repaired', u.status, u.attempt, '{"migration": "0005", "reason": "finished without a result"}'::jsonb
FROM u;

-- name: repair_ranges
-- Bring priorities, ranks and counters a client wrote out of range back into it (the constraints follow).
UPDATE inversions
SET priority = least(greatest(priority, -1000000), 1000000),
    fair_rank = least(greatest(fair_rank, 0), 1000000000000000),
    attempt = greatest(attempt, 0),
    tries = least(greatest(tries, 0), greatest(attempt, 0)),
    max_attempts = least(greatest(max_attempts, 1), 1000)
WHERE priority NOT BETWEEN -1000000 AND 1000000
   OR fair_rank NOT BETWEEN 0 AND 1000000000000000
   OR attempt < 0 OR tries < 0 OR tries > attempt
   OR max_attempts NOT BETWEEN 1 AND 1000;

-- name: add_constraints
-- What must always hold of a job, whoever writes it (the owner too).
ALTER TABLE inversions
    ADD CONSTRAINT ck_inversions_finished_has_result CHECK (status <> 'finished' OR result_sha256 IS NOT NULL),
    ADD CONSTRAINT ck_inversions_priority CHECK (priority BETWEEN -1000000 AND 1000000),
    ADD CONSTRAINT ck_inversions_fair_rank CHECK (fair_rank BETWEEN 0 AND 1000000000000000),
    ADD CONSTRAINT ck_inversions_counters CHECK (attempt >= 0 AND tries >= 0 AND tries <= attempt),
    ADD CONSTRAINT ck_inversions_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 1000);

-- name: drop_constraints
-- Undo add_constraints.
ALTER TABLE inversions
    DROP CONSTRAINT ck_inversions_finished_has_result,
    DROP CONSTRAINT ck_inversions_priority,
    DROP CONSTRAINT ck_inversions_fair_rank,
    DROP CONSTRAINT ck_inversions_counters,
    DROP CONSTRAINT ck_inversions_max_attempts_range;

-- name: login_rank_index
-- Fair share is by login: a login's last waiting job's rank is one index probe.
CREATE INDEX ix_inversions_login_rank ON inversions (db_role, fair_rank) WHERE status = 'queued';

-- name: drop_user_rank_index
-- The rank by the informational username column is no longer read.
DROP INDEX ix_inversions_user_rank;

-- name: user_rank_index
-- Undo drop_user_rank_index.
CREATE INDEX ix_inversions_user_rank ON inversions (username, fair_rank) WHERE status = 'queued';

-- name: drop_login_rank_index
-- Undo login_rank_index.
DROP INDEX ix_inversions_login_rank;

-- name: caller_functions
-- Who the caller (session_user) is: admin or owner (may act on every job), or a worker.
CREATE FUNCTION crh_caller_manages() RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN pg_has_role(session_user, 'crh_admin', 'USAGE')
        OR pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = 'inversions'::regclass), 'USAGE');
END $$;
CREATE FUNCTION crh_caller_runs(p_worker_id bigint) RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- The fence's first part: a worker row of the caller's own login (an admin or the owner may act for any).
    IF crh_caller_manages() THEN
        RETURN;
    END IF;
    IF NOT pg_has_role(session_user, 'crh_worker', 'USAGE') THEN
        RAISE EXCEPTION '% is not a worker login', session_user
            USING ERRCODE = 'insufficient_privilege', HINT = 'an admin grants it: crh db grant-worker NAME';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM workers WHERE id = p_worker_id AND db_role = session_user) THEN
        RAISE EXCEPTION 'worker % is not a worker of %', p_worker_id, session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END $$;
CREATE FUNCTION crh_check_result(p_sha256 text) RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- A worker attaches only an archive its own login uploaded (or that the database found byte-identical).
    IF p_sha256 IS NULL OR crh_caller_manages() THEN
        RETURN;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM blobs b
        WHERE b.sha256 = p_sha256 AND b.complete
          AND (b.db_role = session_user
               OR EXISTS (SELECT 1 FROM blob_owners o WHERE o.blob_id = b.id AND o.db_role = session_user))) THEN
        RAISE EXCEPTION 'archive % was not uploaded by %', left(p_sha256, 12), session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END $$;

-- name: registration_functions
-- A user's registrations become claimable: rank by login (fair share), input checked, event written.
CREATE FUNCTION crh_finish_registrations(p_ids bigint[], p_shas text[], p_os_user text, p_host text, p_pid integer)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    manages boolean := crh_caller_manages();
    bad record;
BEGIN
    -- Every archive must be one the job's owner uploaded (or co-owns after the database compared the bytes).
    SELECT r.sha256, j.db_role INTO bad
    FROM unnest(p_ids, p_shas) AS r(id, sha256)
    JOIN inversions j ON j.id = r.id AND j.status = 'registering' AND (manages OR j.db_role = session_user)
    WHERE NOT EXISTS (
        SELECT 1 FROM blobs b
        WHERE b.sha256 = r.sha256 AND b.complete
          AND (b.db_role = j.db_role
               OR EXISTS (SELECT 1 FROM blob_owners o WHERE o.blob_id = b.id AND o.db_role = j.db_role)))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'archive % was not uploaded by %', left(bad.sha256, 12), bad.db_role
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a job''s input must be an archive its owner uploaded (crh_add does that)';
    END IF;
    RETURN QUERY
    WITH req AS MATERIALIZED (
        SELECT r.id, r.sha256, r.ord, j.db_role
        FROM unnest(p_ids, p_shas) WITH ORDINALITY AS r(id, sha256, ord)
        JOIN inversions j ON j.id = r.id AND j.status = 'registering' AND (manages OR j.db_role = session_user)
    ), base AS MATERIALIZED (
        -- After the login's last waiting job, never behind the queue's front (users take turns).
        SELECT logins.db_role, greatest(
            (SELECT max(i.fair_rank) FROM inversions i WHERE i.status = 'queued' AND i.db_role = logins.db_role),
            (SELECT min(i.fair_rank) FROM inversions i WHERE i.status = 'queued') - 1,
            0) AS rank
        FROM (SELECT DISTINCT req.db_role FROM req) logins
    ), ranked AS MATERIALIZED (
        SELECT req.id, req.sha256, base.rank + row_number() OVER (PARTITION BY req.db_role ORDER BY req.ord) AS fair_rank
        FROM req JOIN base USING (db_role)
    ), u AS (
        UPDATE inversions j
        SET status = 'queued', input_sha256 = r.sha256, datetime_queued = now(), fair_rank = r.fair_rank
        FROM ranked r
        WHERE j.id = r.id AND j.status = 'registering'
        RETURNING j.id, j.status, j.attempt, j.input_sha256
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, detail)
        SELECT u.id, 'queued', u.status, u.attempt, session_user, p_os_user, p_host, p_pid,
               jsonb_build_object('sha256', u.input_sha256)
        FROM u
    )
    SELECT u.id FROM u;
END $$;

-- name: owner_functions
-- What a job's owner (or an admin) does to jobs: cancel, requeue, reprioritise, record retrieval.
CREATE FUNCTION crh_cancel(p_ids bigint[], p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    manages boolean := crh_caller_manages();
    v_id bigint;
BEGIN
    FOR v_id IN
        WITH u AS (
            UPDATE inversions
            SET status = 'cancelled', datetime_finished = now(), lease_expires = NULL
            WHERE id = ANY(p_ids) AND status IN ('registering', 'queued', 'running')
              AND (manages OR db_role = session_user)
            RETURNING id, status, attempt
        ), e AS (
            INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, detail)
            SELECT u.id, 'cancelled', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_detail FROM u
        )
        SELECT u.id FROM u
    LOOP
        -- The worker of a running job stops its solver when it hears this.
        PERFORM pg_notify('crh_cancel', v_id::text);
        RETURN NEXT v_id;
    END LOOP;
END $$;
CREATE FUNCTION crh_requeue(p_ids bigint[], p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    manages boolean := crh_caller_manages();
BEGIN
    RETURN QUERY
    WITH u AS (
        UPDATE inversions
        SET status = 'queued', tries = 0, exit_code = NULL, failure_category = NULL, failure_reason = NULL,
            result_sha256 = NULL, datetime_finished = NULL, datetime_queued = now(), worker_id = NULL,
            lease_expires = NULL
        WHERE id = ANY(p_ids) AND status IN ('failed', 'cancelled') AND NOT downloaded
          AND (manages OR db_role = session_user)
        RETURNING id, status, attempt
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, detail)
        SELECT u.id, 'requeued', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_detail FROM u
    )
    SELECT u.id FROM u;
END $$;
CREATE FUNCTION crh_set_priority(p_ids bigint[], p_priority integer, p_os_user text, p_host text, p_pid integer,
                                 p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    manages boolean := crh_caller_manages();
BEGIN
    RETURN QUERY
    WITH u AS (
        UPDATE inversions
        SET priority = p_priority
        WHERE id = ANY(p_ids) AND status IN ('registering', 'queued', 'running')
          AND (manages OR db_role = session_user)
        RETURNING id, status, attempt
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, detail)
        SELECT u.id, 'priority', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_detail FROM u
    )
    SELECT u.id FROM u;
END $$;
CREATE FUNCTION crh_mark_downloaded(p_ids bigint[], p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    manages boolean := crh_caller_manages();
BEGIN
    RETURN QUERY
    WITH u AS (
        UPDATE inversions
        SET downloaded = true, datetime_downloaded = now()
        WHERE id = ANY(p_ids) AND status IN ('finished', 'failed') AND (manages OR db_role = session_user)
        RETURNING id, status, attempt
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, detail)
        SELECT u.id, 'downloaded', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_detail FROM u
    )
    SELECT u.id FROM u;
END $$;

-- name: worker_functions
-- What a worker does to jobs: claim, renew, complete, fail, release, rescue; each fenced by login, worker id and attempt.
CREATE FUNCTION crh_claim(p_worker_id bigint, p_can_mod boolean, p_can_inv boolean, p_groups text[],
                          p_max_threads integer, p_avoid bigint[], p_lease_s double precision,
                          p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF inversions LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    PERFORM crh_caller_runs(p_worker_id);
    RETURN QUERY
    WITH next AS (
        -- Best: highest priority, then fair-share rank, then id (ix_inversions_claim); SKIP LOCKED
        -- passes over the row another claimer is taking.
        SELECT i.id FROM inversions i
        WHERE i.status = 'queued'
          AND ((i.sim_type = 'mod' AND p_can_mod)
               OR (i.sim_type = 'inv' AND p_can_inv AND (NOT i.model_first OR p_can_mod)))
          AND (CASE WHEN cardinality(p_groups) = 0 THEN i.job_group IS NULL ELSE i.job_group = ANY(p_groups) END)
          AND (p_max_threads IS NULL OR i.threads <= p_max_threads)
          -- Jobs this worker gave back after a node failure moments ago go to another worker first.
          AND NOT (i.id = ANY(p_avoid))
        ORDER BY i.priority DESC, i.fair_rank, i.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ), u AS (
        UPDATE inversions j
        SET status = 'running', attempt = j.attempt + 1, tries = j.tries + 1,
            worker_id = p_worker_id, inv_computer = p_host, datetime_started = now(),
            lease_expires = now() + make_interval(secs => p_lease_s),
            exit_code = NULL, failure_category = NULL, failure_reason = NULL
        FROM next
        WHERE j.id = next.id
        RETURNING j.*
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, worker_id, detail)
        SELECT u.id, 'claimed', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_worker_id, p_detail
        FROM u
    )
    SELECT * FROM u;
END $$;
CREATE FUNCTION crh_renew(p_worker_id bigint, p_ids bigint[], p_attempts integer[], p_lease_s double precision)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    PERFORM crh_caller_runs(p_worker_id);
    RETURN QUERY
    UPDATE inversions j SET lease_expires = now() + make_interval(secs => p_lease_s)
    FROM unnest(p_ids, p_attempts) AS held(id, attempt)
    WHERE j.id = held.id AND j.attempt = held.attempt AND j.status = 'running' AND j.worker_id = p_worker_id
    RETURNING j.id;
END $$;
CREATE FUNCTION crh_complete(p_id bigint, p_attempt integer, p_worker_id bigint, p_result_sha256 text,
                             p_exit_code integer, p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    PERFORM crh_caller_runs(p_worker_id);
    -- Without a result the fence may still refuse (no row); where it does not, the
    -- constraint ck_inversions_finished_has_result refuses the finish.
    PERFORM crh_check_result(p_result_sha256);
    RETURN QUERY
    WITH u AS (
        UPDATE inversions
        SET status = 'finished', result_sha256 = p_result_sha256, exit_code = p_exit_code,
            datetime_finished = now(), lease_expires = NULL
        WHERE id = p_id AND attempt = p_attempt AND status = 'running' AND worker_id = p_worker_id
        RETURNING id, status, attempt
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, worker_id, detail)
        SELECT u.id, 'finished', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_worker_id, p_detail
        FROM u
    )
    SELECT u.id FROM u;
END $$;
CREATE FUNCTION crh_fail(p_id bigint, p_attempt integer, p_worker_id bigint, p_result_sha256 text,
                         p_exit_code integer, p_category text, p_reason text,
                         p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    PERFORM crh_caller_runs(p_worker_id);
    PERFORM crh_check_result(p_result_sha256);
    RETURN QUERY
    WITH u AS (
        UPDATE inversions
        SET status = 'failed', result_sha256 = p_result_sha256, exit_code = p_exit_code,
            failure_category = p_category, failure_reason = p_reason,
            datetime_finished = now(), lease_expires = NULL
        WHERE id = p_id AND attempt = p_attempt AND status = 'running' AND worker_id = p_worker_id
        RETURNING id, status, attempt
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, worker_id, detail)
        SELECT u.id, 'failed', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_worker_id, p_detail
        FROM u
    )
    SELECT u.id FROM u;
END $$;
CREATE FUNCTION crh_release(p_id bigint, p_attempt integer, p_worker_id bigint,
                            p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    PERFORM crh_caller_runs(p_worker_id);
    RETURN QUERY
    WITH u AS (
        UPDATE inversions
        SET status = 'queued', tries = greatest(tries - 1, 0), worker_id = NULL, lease_expires = NULL,
            datetime_queued = now()
        WHERE id = p_id AND attempt = p_attempt AND status = 'running' AND worker_id = p_worker_id
        RETURNING id, status, attempt
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, worker_id, detail)
        SELECT u.id, 'released', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_worker_id, p_detail
        FROM u
    )
    SELECT u.id FROM u;
END $$;
CREATE FUNCTION crh_rescue(p_grace_s double precision, p_restart_grace_s double precision,
                           p_lock_namespace integer, p_worker_id bigint,
                           p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS TABLE (id bigint, status text) LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    -- Any worker may sweep for the fleet (one sweeper serves all); users may not.
    IF NOT (crh_caller_manages() OR pg_has_role(session_user, 'crh_worker', 'USAGE')) THEN
        RAISE EXCEPTION '% is not a worker login', session_user USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    WITH lost AS (
        -- Gone: the lease ran out, or both signals of a live worker are missing (its heartbeat is
        -- older than grace and nobody holds its liveness lock); just after a server restart
        -- (which drops every lock) only leases count.  A worker that has not beaten since the server
        -- started gets p_restart_grace_s after the start to reconnect and renew (longer than the cap
        -- of its reconnection backoff, cr_queue/worker/reconnect.py): its leases ran on while the
        -- server was down, and nobody could tell it anything then.
        SELECT j.id
        FROM inversions j
        LEFT JOIN workers w ON w.id = j.worker_id
        WHERE j.status = 'running'
          AND NOT (coalesce(w.last_heartbeat < pg_postmaster_start_time(), false)
                   AND pg_postmaster_start_time() > now() - make_interval(secs => p_restart_grace_s))
          AND (j.lease_expires < now()
               OR (coalesce(w.last_heartbeat < now() - make_interval(secs => p_grace_s), true)
                   AND pg_postmaster_start_time() < now() - make_interval(secs => p_grace_s)
                   AND NOT EXISTS (
                       SELECT 1 FROM pg_locks l
                       WHERE l.locktype = 'advisory' AND l.granted
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                         AND l.classid = p_lock_namespace::oid AND l.objid::bigint = j.worker_id
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
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, worker_id, detail)
        SELECT u.id, 'rescued', u.status, u.attempt, session_user, p_os_user, p_host, p_pid, p_worker_id, p_detail
        FROM u
    )
    SELECT u.id, u.status FROM u;
END $$;

-- name: release_node_failure_function
-- Give a job back after a node failure, or fail it once enough workers could not run it
-- (its own block, CREATE OR REPLACE: 0007's downgrade brings this definition back).
CREATE OR REPLACE FUNCTION crh_release_node_failure(p_id bigint, p_attempt integer, p_worker_id bigint, p_reason text,
                                          p_max_nodes integer, p_os_user text, p_host text, p_pid integer,
                                          p_detail jsonb)
RETURNS TABLE (id bigint, status text) LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    -- Give a job back after a node failure (no try used), or fail it as node_failures once
    -- p_max_nodes distinct workers (this one included) could not run it: no single job can
    -- empty the pool.  The history is the job's events, each node-failure release naming its
    -- worker, host and reason.
    PERFORM crh_caller_runs(p_worker_id);
    RETURN QUERY
    WITH j AS (
        SELECT i.id FROM inversions i
        WHERE i.id = p_id AND i.attempt = p_attempt AND i.status = 'running' AND i.worker_id = p_worker_id
        FOR UPDATE
    ), earlier AS (
        SELECT DISTINCT ON (e.worker_id) e.worker_id, e.host, e.detail ->> 'reason' AS reason
        FROM events e JOIN j ON e.job_id = j.id
        WHERE e.event = 'released' AND e.detail ? 'node_failure' AND e.worker_id IS DISTINCT FROM p_worker_id
        ORDER BY e.worker_id, e.id DESC
    ), nodes AS (
        SELECT earlier.worker_id, earlier.host, earlier.reason FROM earlier
        UNION ALL
        SELECT p_worker_id, p_host, p_reason
    ), verdict AS (
        SELECT count(*) >= p_max_nodes AS give_up,
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
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, worker_id, detail)
        SELECT u.id, CASE WHEN u.status = 'failed' THEN 'failed' ELSE 'released' END, u.status, u.attempt,
               session_user, p_os_user, p_host, p_pid, p_worker_id, p_detail
        FROM u
    )
    SELECT u.id, u.status FROM u;
END $$;

-- name: guard_registration
-- A user changes a job's row directly only while it registers (its own settings); state changes go through the functions.
CREATE FUNCTION crh_guard_registration() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF crh_privileged() THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.status <> 'registering' THEN
        RAISE EXCEPTION 'a new job starts in registering, not %', NEW.status
            USING ERRCODE = 'insufficient_privilege', HINT = 'crh_add registers jobs; crh_finish_registrations queues them';
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status <> 'registering' THEN
        RAISE EXCEPTION 'job % is %: only its registration may be changed directly', OLD.id, OLD.status
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'use crh cancel, crh requeue, crh priority (the crh_* functions)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER crh_guard_registration BEFORE INSERT OR UPDATE ON inversions
FOR EACH ROW EXECUTE FUNCTION crh_guard_registration();

-- name: pin_search_path
-- Every function of this migration resolves names only in pg_catalog and this schema (pg_temp last), so nobody can slip in look-alikes.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('crh_caller_manages', 'crh_caller_runs', 'crh_check_result', 'crh_finish_registrations',
                            'crh_cancel', 'crh_requeue', 'crh_set_priority', 'crh_mark_downloaded', 'crh_claim',
                            'crh_renew', 'crh_complete', 'crh_fail', 'crh_release', 'crh_release_node_failure', 'crh_rescue',
                            'crh_guard_registration')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
    END LOOP;
END $$;

-- name: grants
-- No login but the owner updates state columns: users keep only their registration's settings, workers nothing; the functions do the rest.
REVOKE UPDATE ON inversions FROM crh_admin, crh_worker, crh_user;
REVOKE INSERT ON events FROM crh_worker;
REVOKE USAGE ON SEQUENCE events_id_seq FROM crh_worker;
GRANT UPDATE (sim_type, model_first, crh_file, priority, job_group, threads, timeout_s, max_attempts, sipdir,
              datetime_init) ON inversions TO crh_admin, crh_user;
-- The helpers run only inside the functions above (as the owner); nobody calls them directly.
REVOKE ALL ON FUNCTION crh_caller_manages(), crh_caller_runs(bigint), crh_check_result(text),
    crh_guard_registration() FROM PUBLIC;
REVOKE ALL ON FUNCTION
    crh_finish_registrations(bigint[], text[], text, text, integer),
    crh_cancel(bigint[], text, text, integer, jsonb),
    crh_requeue(bigint[], text, text, integer, jsonb),
    crh_set_priority(bigint[], integer, text, text, integer, jsonb),
    crh_mark_downloaded(bigint[], text, text, integer, jsonb),
    crh_claim(bigint, boolean, boolean, text[], integer, bigint[], double precision, text, text, integer, jsonb),
    crh_renew(bigint, bigint[], integer[], double precision),
    crh_complete(bigint, integer, bigint, text, integer, text, text, integer, jsonb),
    crh_fail(bigint, integer, bigint, text, integer, text, text, text, text, integer, jsonb),
    crh_release(bigint, integer, bigint, text, text, integer, jsonb),
    crh_release_node_failure(bigint, integer, bigint, text, integer, text, text, integer, jsonb),
    crh_rescue(double precision, double precision, integer, bigint, text, text, integer, jsonb)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    crh_finish_registrations(bigint[], text[], text, text, integer),
    crh_cancel(bigint[], text, text, integer, jsonb),
    crh_requeue(bigint[], text, text, integer, jsonb),
    crh_set_priority(bigint[], integer, text, text, integer, jsonb),
    crh_mark_downloaded(bigint[], text, text, integer, jsonb)
TO crh_admin, crh_user;
GRANT EXECUTE ON FUNCTION
    crh_claim(bigint, boolean, boolean, text[], integer, bigint[], double precision, text, text, integer, jsonb),
    crh_renew(bigint, bigint[], integer[], double precision),
    crh_complete(bigint, integer, bigint, text, integer, text, text, integer, jsonb),
    crh_fail(bigint, integer, bigint, text, integer, text, text, text, text, integer, jsonb),
    crh_release(bigint, integer, bigint, text, text, integer, jsonb),
    crh_release_node_failure(bigint, integer, bigint, text, integer, text, text, integer, jsonb),
    crh_rescue(double precision, double precision, integer, bigint, text, text, integer, jsonb)
TO crh_admin, crh_worker;

-- name: policies
-- A worker login no longer updates jobs directly, and reads an archive only while it is the input of a job one of its workers holds now, or its own upload until that becomes a job's result (sealing needs to see it).
DROP POLICY crh_worker_update ON inversions;
DROP POLICY crh_worker_read ON blobs;
CREATE POLICY crh_worker_read ON blobs FOR SELECT TO crh_worker USING (
    (db_role = current_user AND NOT EXISTS (SELECT 1 FROM inversions r WHERE r.result_sha256 = blobs.sha256))
    OR EXISTS (SELECT 1 FROM inversions j JOIN workers w ON w.id = j.worker_id
               WHERE j.input_sha256 = blobs.sha256 AND j.status = 'running' AND w.db_role = current_user));

-- name: undo_policies
-- Undo policies (the policies of migration 0003).
DROP POLICY crh_worker_read ON blobs;
CREATE POLICY crh_worker_read ON blobs FOR SELECT TO crh_worker USING (
    db_role = current_user
    OR EXISTS (SELECT 1 FROM inversions j JOIN workers w ON w.id = j.worker_id
               WHERE j.input_sha256 = blobs.sha256 AND j.status = 'running' AND w.db_role = current_user));
CREATE POLICY crh_worker_update ON inversions FOR UPDATE TO crh_worker
USING (status IN ('queued', 'running')) WITH CHECK (true);

-- name: undo_grants
-- Undo grants (the grants of migration 0003).
REVOKE UPDATE ON inversions FROM crh_admin, crh_user;
GRANT UPDATE ON inversions TO crh_admin;
GRANT INSERT ON events TO crh_worker;
GRANT USAGE ON SEQUENCE events_id_seq TO crh_worker;
GRANT UPDATE (status, attempt, tries, worker_id, inv_computer, datetime_started, datetime_finished,
              datetime_queued, lease_expires, exit_code, failure_category, failure_reason, result_sha256)
ON inversions TO crh_worker;
GRANT UPDATE (status, sim_type, model_first, username, crh_file, priority, job_group, threads, timeout_s,
              max_attempts, sipdir, datetime_init, input_sha256, datetime_queued, fair_rank, datetime_finished,
              lease_expires, tries, exit_code, failure_category, failure_reason, result_sha256, worker_id, downloaded,
              datetime_downloaded)
ON inversions TO crh_user;

-- name: drop_functions
-- Undo the functions and the trigger of this migration.
DROP TRIGGER crh_guard_registration ON inversions;
DROP FUNCTION crh_guard_registration();
DROP FUNCTION crh_finish_registrations(bigint[], text[], text, text, integer);
DROP FUNCTION crh_cancel(bigint[], text, text, integer, jsonb);
DROP FUNCTION crh_requeue(bigint[], text, text, integer, jsonb);
DROP FUNCTION crh_set_priority(bigint[], integer, text, text, integer, jsonb);
DROP FUNCTION crh_mark_downloaded(bigint[], text, text, integer, jsonb);
DROP FUNCTION crh_claim(bigint, boolean, boolean, text[], integer, bigint[], double precision, text, text, integer, jsonb);
DROP FUNCTION crh_renew(bigint, bigint[], integer[], double precision);
DROP FUNCTION crh_complete(bigint, integer, bigint, text, integer, text, text, integer, jsonb);
DROP FUNCTION crh_fail(bigint, integer, bigint, text, integer, text, text, text, text, integer, jsonb);
DROP FUNCTION crh_release(bigint, integer, bigint, text, text, integer, jsonb);
DROP FUNCTION crh_release_node_failure(bigint, integer, bigint, text, integer, text, text, integer, jsonb);
DROP FUNCTION crh_rescue(double precision, double precision, integer, bigint, text, text, integer, jsonb);
DROP FUNCTION crh_check_result(text);
DROP FUNCTION crh_caller_runs(bigint);
DROP FUNCTION crh_caller_manages();
