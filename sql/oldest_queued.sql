-- The job that has waited longest, and for how long.
SELECT id, username, source_computer, source_path, priority, now() - datetime_queued AS waiting
FROM inversions WHERE status = 'queued'
ORDER BY datetime_queued LIMIT 1;
