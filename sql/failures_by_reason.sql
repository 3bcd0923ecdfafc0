-- Why jobs failed, most common first, with one example reason each.
SELECT failure_category, count(*) AS jobs, min(failure_reason) AS example
FROM inversions WHERE status = 'failed'
GROUP BY failure_category ORDER BY jobs DESC;
