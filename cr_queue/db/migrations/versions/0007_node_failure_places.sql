-- Migration 0007: a node is a host and its scratch directory (read by 0007_node_failure_places.py).
--
-- crh_release_node_failure (0005) failed a job as node_failures once three
-- distinct *workers* had given it back; a worker restarted on the same broken
-- node (a full scratch disk) counted as a new one, and the long fault run
-- (seed 2) saw a job no other node had tried fail so.  The same signature,
-- grants and search_path; only the count changes.

-- name: count_nodes
-- Count node-failure releases by node (host and scratch directory), not by worker process.
CREATE OR REPLACE FUNCTION crh_release_node_failure(p_id bigint, p_attempt integer, p_worker_id bigint, p_reason text,
                                          p_max_nodes integer, p_os_user text, p_host text, p_pid integer,
                                          p_detail jsonb)
RETURNS TABLE (id bigint, status text) LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    -- Give a job back after a node failure (no try used), or fail it as node_failures once
    -- p_max_nodes distinct nodes (this one included) could not run it.  A node is a host and
    -- the scratch directory its worker runs jobs in (p_detail ->> 'scratch'): a worker
    -- restarted there (by its service manager, a SLURM pilot) is the same node, with the same
    -- full disk or missing library.  Releases written before 0007 name no scratch directory;
    -- their worker stands for the node, as 0005 counted.
    PERFORM crh_caller_runs(p_worker_id);
    RETURN QUERY
    WITH j AS (
        SELECT i.id FROM inversions i
        WHERE i.id = p_id AND i.attempt = p_attempt AND i.status = 'running' AND i.worker_id = p_worker_id
        FOR UPDATE
    ), earlier AS (
        SELECT DISTINCT ON (place) e.worker_id, e.host, e.detail ->> 'scratch' AS scratch,
               e.detail ->> 'reason' AS reason,
               e.host || ' ' || coalesce(e.detail ->> 'scratch', 'worker ' || e.worker_id) AS place
        FROM events e JOIN j ON e.job_id = j.id
        WHERE e.event = 'released' AND e.detail ? 'node_failure'
        ORDER BY place, e.id DESC
    ), nodes AS (
        SELECT earlier.worker_id, earlier.host, earlier.scratch, earlier.reason FROM earlier
        WHERE earlier.place <> p_host || ' ' || coalesce(p_detail ->> 'scratch', 'worker ' || p_worker_id)
        UNION ALL
        SELECT p_worker_id, p_host, p_detail ->> 'scratch', p_reason
    ), verdict AS (
        SELECT count(*) >= p_max_nodes AS give_up,
               'given back on ' || count(*) || ' nodes, each unable to run it: '
               || string_agg(coalesce(w.name, 'worker ' || n.worker_id) || ' on ' || n.host
                             || coalesce(':' || n.scratch, '') || ' (' || n.reason || ')',
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

-- name: pin_search_path
-- The replaced function resolves names only in pg_catalog and this schema, as 0005 pinned it.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION crh_release_node_failure(bigint, integer, bigint, text, integer, text, text, '
                   'integer, jsonb) SET search_path = pg_catalog, %I, pg_temp', current_schema());
END $$;
