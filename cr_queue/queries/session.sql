-- Settings of one database session and the housekeeping statements around them
-- (wrappers: cr_queue/queries/session.py).  None of them touches a job.

-- name: bound_idle_transactions
-- Have the server end this session when it leaves a transaction open longer than timeout (e.g. '10000ms').
SELECT set_config('idle_in_transaction_session_timeout', %(timeout)s, false);

-- name: bound_idle_session
-- Have the server end this session when it sends nothing for longer than timeout (e.g. '15000ms'); a no-op before PostgreSQL 14.
-- A worker's control session speaks every few seconds; one that falls silent (a network cut
-- that leaves the server's end open) must not keep its locks (liveness, rescue leader) for hours.
SELECT set_config('idle_session_timeout', %(timeout)s, false)
WHERE current_setting('server_version_num')::int >= 140000;

-- name: synchronous_commit
-- Whether this session's commits wait for the WAL to reach disk ('on') or not ('off'); local: this transaction only.
SELECT set_config('synchronous_commit', %(setting)s, %(local)s);

-- name: durable_commit
-- Commit a transaction that waits for the WAL to reach disk, and so for every earlier asynchronous commit of the server.
SELECT txid_current();

-- name: read_only_snapshot
-- Make the transaction just begun one read-only snapshot: every query after it sees the same database.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: schema_revision
-- The alembic revision the database's schema is at (fails when no migration ever ran).
SELECT version_num FROM alembic_version;

-- name: has_schema_revision
-- Whether the database has alembic's table at all (asked first, so that no ERROR for a missing table lands in the server's log).
SELECT to_regclass('alembic_version') IS NOT NULL;
