-- Finished jobs per hour and node over the last day: throughput at a glance.
SELECT date_trunc('hour', datetime_finished) AS hour, inv_computer, count(*) AS finished
FROM inversions
WHERE status = 'finished' AND datetime_finished >= now() - interval '1 day'
GROUP BY 1, 2 ORDER BY 1 DESC, 2;
