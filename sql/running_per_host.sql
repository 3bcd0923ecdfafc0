-- Which nodes are running how many jobs right now, and since when the oldest.
SELECT inv_computer, count(*) AS running, min(datetime_started) AS oldest_start
FROM inversions WHERE status = 'running'
GROUP BY inv_computer ORDER BY running DESC;
