-- Migration 0006: retention of retrieved results (read by 0006_retention.py).
--
-- A purge lets go of a retrieved job's archives and keeps its row and events:
-- the job's hashes become NULL (the `purged` event keeps them) and
-- datetime_purged says when.  Like every change of a job since 0005 it runs
-- in a function (SECURITY DEFINER, search_path pinned) that checks the caller
-- and writes the event in the same statement.

-- name: add_purged_column
-- When a job's archives were purged (NULL: still stored).
ALTER TABLE inversions ADD COLUMN datetime_purged timestamp with time zone;

-- name: drop_purged_column
-- Undo add_purged_column.
ALTER TABLE inversions DROP COLUMN datetime_purged;

-- name: finished_has_result_or_purged
-- A finished job has a result, unless the result was purged after retrieval.
ALTER TABLE inversions
    DROP CONSTRAINT ck_inversions_finished_has_result,
    ADD CONSTRAINT ck_inversions_finished_has_result
        CHECK (status <> 'finished' OR result_sha256 IS NOT NULL OR datetime_purged IS NOT NULL);

-- name: finished_has_result
-- Undo finished_has_result_or_purged (a purged finished job becomes failed first, saying why).
UPDATE inversions SET status = 'failed', failure_category = 'no_result',
                      failure_reason = 'its result was purged after retrieval'
WHERE status = 'finished' AND result_sha256 IS NULL;
ALTER TABLE inversions
    DROP CONSTRAINT ck_inversions_finished_has_result,
    ADD CONSTRAINT ck_inversions_finished_has_result CHECK (status <> 'finished' OR result_sha256 IS NOT NULL);

-- name: purge_function
-- Let go of the archives of retrieved jobs (each checked again: ended, retrieved, not purged, retrieved more than keep_s ago); admins and the owner only.
CREATE FUNCTION crh_purge_archives(p_ids bigint[], p_keep_s double precision,
                                   p_os_user text, p_host text, p_pid integer, p_detail jsonb)
RETURNS TABLE (id bigint, input_sha256 text, result_sha256 text) LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    IF NOT crh_caller_manages() THEN
        RAISE EXCEPTION '% may not purge archives', session_user
            USING ERRCODE = 'insufficient_privilege', HINT = 'crh_cleanup runs as an admin login or the owner';
    END IF;
    RETURN QUERY
    WITH chosen AS (
        SELECT j.id, j.status, j.attempt, j.input_sha256, j.result_sha256
        FROM inversions j
        WHERE j.id = ANY(p_ids) AND j.downloaded AND j.datetime_purged IS NULL
          AND j.status IN ('finished', 'failed', 'cancelled')
          AND j.datetime_downloaded <= now() - make_interval(secs => p_keep_s)
        FOR UPDATE
    ), purged AS (
        UPDATE inversions j
        SET input_sha256 = NULL, result_sha256 = NULL, datetime_purged = now()
        FROM chosen c
        WHERE j.id = c.id
    ), e AS (
        INSERT INTO events (job_id, event, status, attempt, db_role, os_user, host, pid, detail)
        SELECT c.id, 'purged', c.status, c.attempt, session_user, p_os_user, p_host, p_pid,
               p_detail || jsonb_strip_nulls(jsonb_build_object('input_sha256', c.input_sha256,
                                                                'result_sha256', c.result_sha256))
        FROM chosen c
    )
    SELECT c.id, c.input_sha256, c.result_sha256 FROM chosen c ORDER BY c.id;
END $$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION crh_purge_archives(bigint[], double precision, text, text, integer, jsonb) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
END $$;
REVOKE ALL ON FUNCTION crh_purge_archives(bigint[], double precision, text, text, integer, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION crh_purge_archives(bigint[], double precision, text, text, integer, jsonb) TO crh_admin;

-- name: drop_purge_function
-- Undo purge_function.
DROP FUNCTION crh_purge_archives(bigint[], double precision, text, text, integer, jsonb);
