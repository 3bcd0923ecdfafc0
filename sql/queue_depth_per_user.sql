-- Waiting and running jobs per user and group.
SELECT username, coalesce(job_group, '-') AS job_group,
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'running') AS running
FROM inversions WHERE status IN ('queued', 'running')
GROUP BY 1, 2 ORDER BY queued DESC;
