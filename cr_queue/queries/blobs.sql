-- Archives: the blobs rows that name them by their sha256, and the chunks of
-- those kept in the database (binary_data).  Run by cr_queue/store through the
-- wrappers in cr_queue/queries/blobs.py.
--
-- An upload makes its row unsealed (sha256 NULL: the hash is known only once
-- the last byte is packed), COPYs its chunks in (location 'db') or writes its
-- file first (location 'dir', [store] path), then seals the row: hash, sizes,
-- complete.  The unique sha256 stores each content once.

-- name: begin
-- Open an upload's transaction; it travels in one round trip with the statements that follow it (pipeline mode).
-- Its commit does not wait for the disk (session.sql's synchronous_commit, local): nothing
-- refers to an upload until a later synchronous commit of the caller names it
-- (finish_registration, complete), and PostgreSQL's WAL is sequential: that commit
-- makes the upload durable too.
BEGIN

-- name: commit
-- Close an upload's transaction; sent with its last statement where there is one (pipeline mode).
COMMIT

-- name: new_blob
-- An unsealed row for an upload whose hash is not known yet: a large archive, streamed into binary_data in batches while it is packed.
INSERT INTO blobs (location) VALUES (%(location)s) RETURNING id

-- name: new_blob_unless_stored
-- An unsealed row for an archive unless its content is stored already (and visible
-- to the caller): the duplicate is found in this one statement.
INSERT INTO blobs (location)
SELECT %(location)s
WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE sha256 = %(sha256)s AND complete)
RETURNING id

-- name: new_blobs_unless_stored
-- new_blob_unless_stored for a batch of archives (crh_add's helpers deliver many at
-- once), in one statement: each gets its id with its sha256.  The ids are taken from
-- the sequence in a CTE, which runs once, so the INSERT and the result see the same
-- ones.  (For one archive the statement above costs the server half as much: measured.)
WITH want AS MATERIALIZED (
    SELECT s.sha256, nextval(pg_get_serial_sequence('blobs', 'id')) AS id
    FROM unnest(%(shas)s::text[]) WITH ORDINALITY AS s(sha256, ord)
    WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.sha256 = s.sha256 AND b.complete)
    ORDER BY s.ord
), made AS (
    INSERT INTO blobs (id, location) SELECT id, %(location)s FROM want
)
SELECT sha256, id FROM want

-- name: copy_chunks
-- Stream chunks into binary_data (binary rows: blob_id int8, chunk_no int4, data bytea); a trigger lets a user write only into its own unsealed blob.
COPY binary_data (blob_id, chunk_no, data) FROM STDIN (FORMAT BINARY)

-- name: seal
-- Name an upload by its hash and mark it complete.  A unique violation means the
-- same content was sealed meanwhile, or is stored by another user whose row is
-- hidden from the caller by row security.
UPDATE blobs
SET sha256 = %(sha256)s, size = %(size)s, raw_size = %(raw_size)s, n_chunks = %(n_chunks)s,
    complete = true, datetime_completed = now()
WHERE id = %(blob_id)s

-- name: seal_many
-- seal for a batch of uploads, in one statement.  (For one upload the statement above costs the server half as much: measured.)
UPDATE blobs b
SET sha256 = u.sha256, size = u.size, raw_size = u.raw_size, n_chunks = u.n_chunks,
    complete = true, datetime_completed = now()
FROM unnest(%(ids)s::bigint[], %(shas)s::text[], %(sizes)s::bigint[], %(raw_sizes)s::bigint[], %(n_chunks)s::int[])
     AS u(id, sha256, size, raw_size, n_chunks)
WHERE b.id = u.id

-- name: is_stored
-- Whether this content is stored whole (among the archives the caller may see).
SELECT EXISTS (SELECT 1 FROM blobs WHERE sha256 = %(sha256)s AND complete)

-- name: adopt
-- The caller's upload equals a stored copy it may not see: the database compares the bytes and, only if they are the same, makes the caller a co-owner of that copy.
SELECT crh_adopt_blob(%(blob_id)s, %(sha256)s)

-- name: drop
-- Remove an upload that is not needed (abandoned, or its content stored already); its chunks go with it.
DELETE FROM blobs WHERE id = %(blob_id)s

-- name: look_up
-- An archive's row, for reading it (if it is stored whole and the caller may see it).
SELECT sha256, id, n_chunks, size, location
FROM blobs
WHERE sha256 = %(sha256)s AND complete

-- name: look_up_many
-- look_up for many archives in one statement (all of crh_retrieve's results).
SELECT sha256, id, n_chunks, size, location
FROM blobs
WHERE sha256 = ANY(%(shas)s::text[]) AND complete

-- name: read_chunks
-- A few of a blob's chunks in order, through the view that shows only chunks of blobs the caller may see (row-level security).
SELECT chunk_no, data
FROM blob_chunks
WHERE blob_id = %(blob_id)s AND chunk_no >= %(first)s
ORDER BY chunk_no
LIMIT %(n)s

-- name: garbage
-- The one definition of an archive nobody needs: crh_cleanup's plan (--dry-run) and its
-- deletion both read it, so what is shown is what goes.  A whole archive that no job
-- refers to (input or result), the jobs this run deletes or purges (doomed) not counted,
-- and that either such a job released in this run (released: it goes with its job, no
-- grace) or was sealed more than grace seconds ago (an upload is unreferenced for a
-- moment between its seal and the statement that names it in its job); and an upload
-- that never completed, older than stale (an interrupted crh_add or worker).  Only the
-- ids given, when given.  Locked, so no job takes one up before it is deleted.
SELECT b.id, b.sha256, b.complete, b.location, b.datetime_created AS created,
       CASE WHEN b.complete THEN b.size
            ELSE (SELECT coalesce(sum(pg_column_size(c.data)), 0) FROM binary_data c WHERE c.blob_id = b.id)
       END::bigint AS bytes
FROM blobs b
WHERE (%(ids)s::bigint[] IS NULL OR b.id = ANY(%(ids)s::bigint[]))
  AND ((b.complete
        AND (b.sha256 = ANY(%(released)s::text[])
             OR coalesce(b.datetime_completed, b.datetime_created) < now() - make_interval(secs => %(grace)s))
        AND NOT EXISTS (SELECT 1 FROM inversions j
                        WHERE j.input_sha256 = b.sha256 AND j.id <> ALL(%(doomed)s::bigint[]))
        AND NOT EXISTS (SELECT 1 FROM inversions j
                        WHERE j.result_sha256 = b.sha256 AND j.id <> ALL(%(doomed)s::bigint[])))
       OR (NOT b.complete AND b.datetime_created < now() - make_interval(secs => %(stale)s)))
ORDER BY b.id
LIMIT %(limit)s
FOR UPDATE OF b SKIP LOCKED

-- name: delete_garbage
-- Delete the archives garbage chose and locked a moment ago in the same transaction; their chunks go with them.
DELETE FROM blobs WHERE id = ANY(%(ids)s::bigint[])
RETURNING id

-- name: known
-- Which of these hashes a blobs row knows (the directory sweep removes files no row knows).
SELECT sha256 FROM blobs WHERE sha256 = ANY(%(shas)s::text[])
