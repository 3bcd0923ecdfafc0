-- The whole history of one job: who did what, where and when.
-- Usage: psql "$URL" -v job=42 -f sql/job_history.sql
SELECT datetime, event, status, attempt, db_role, os_user, host, pid, worker_id, detail
FROM events WHERE job_id = :job ORDER BY id;
