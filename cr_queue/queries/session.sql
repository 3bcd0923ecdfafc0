-- Settings of one database session and the housekeeping statements around them
-- (wrappers: cr_queue/queries/session.py).  None of them touches a job.

-- name: bound_idle_transactions
-- Have the server end this session when it leaves a transaction open longer than timeout (e.g. '10000ms').
-- Never sent through a transaction-pooling pooler (it would stay on a shared server connection); there the pooler's TCP keepalive ends a vanished client's transaction.
SELECT set_config('idle_in_transaction_session_timeout', %(timeout)s, false);

-- name: bound_idle_session
-- Have the server end this session when it sends nothing for longer than timeout (e.g. '15000ms'); a no-op before PostgreSQL 14.
-- A worker's control session speaks every few seconds; one that falls silent (a network cut
-- that leaves the server's end open) must not keep its locks (liveness, rescue leader) for hours.
SELECT set_config('idle_session_timeout', %(timeout)s, false)
WHERE current_setting('server_version_num')::int >= 140000;

-- name: synchronous_commit
-- Whether this session's commits wait for the WAL to reach disk ('on') or not ('off'); local: this transaction only
-- (the only form sent through a transaction-pooling pooler: a session-wide one would stay on a shared server connection).
SELECT set_config('synchronous_commit', %(setting)s, %(local)s);

-- name: durable_commit
-- Commit a transaction that waits for the WAL to reach disk, and so for every earlier asynchronous commit of the server.
-- It must write WAL of its own: PostgreSQL does not wait for the disk when a transaction wrote none (an xid
-- alone, txid_current(), is not enough: the fault run lost two jobs crh_add had reported as queued).  A
-- transactional logical message is the smallest such write any login may make; nothing reads it.
SELECT pg_logical_emit_message(true, 'cr_queue', 'durable');

-- name: read_only_snapshot
-- Make the transaction just begun one read-only snapshot: every query after it sees the same database.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: schema_revision
-- The alembic revision the database's schema is at (fails when no migration ever ran).
SELECT version_num FROM alembic_version;

-- name: has_schema_revision
-- Whether the database has alembic's table at all (asked first, so that no ERROR for a missing table lands in the server's log).
SELECT to_regclass('alembic_version') IS NOT NULL;

-- name: try_transaction_locks
-- Take a transaction-level advisory lock per key (crh_add, crh_retrieve: their directories, see directory_locks.py),
-- held until this transaction ends: the form of try_locks (jobs.sql) for a connection through a transaction-pooling
-- pooler, where a session lock would stay on a server connection other clients get next.  Returns the keys another
-- session holds, each with that session's application_name (NULL where it cannot be seen).
SELECT k.key,
       (SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND ((l.classid::bigint << 32) | l.objid::bigint) = k.key
        LIMIT 1) AS holder
FROM unnest(%(keys)s::bigint[]) AS k(key)
WHERE NOT pg_try_advisory_xact_lock(k.key);
