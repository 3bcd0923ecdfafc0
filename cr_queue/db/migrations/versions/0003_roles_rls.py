"""Many users, one database: roles, row-level security, blob ownership.

Three group roles (NOLOGIN) carry every privilege; logins only get one of
them (``crh db grant-user`` / ``crh db grant-worker``):

* ``crh_admin``  everything on every row (policies, since BYPASSRLS is not
  inherited through role membership);
* ``crh_worker`` claims, renews, completes, fails and releases jobs, writes
  events, reads the input archives of the jobs it holds and writes results;
  no DELETE of jobs, no job metadata changes beyond the lifecycle columns;
* ``crh_user``   registers jobs and sees, cancels, requeues, reprioritises and
  retrieves only the jobs its own login registered (``db_role``), and only
  the archives it uploaded itself or that are results of its jobs.

The table owner (the role that runs ``crh db upgrade``) is not subject to row
security, so the embedded single-user database works as before.

``binary_data`` cannot use row security (PostgreSQL refuses COPY FROM into a
table with row security, and COPY is how archives are streamed in), so its
reads go through the view ``blob_chunks``, which shows a chunk only when its
blob is visible to the caller under the row security of ``blobs``; its writes
are checked by a trigger (only into the caller's own unsealed blob).

Downgrade removes every grant, policy, function and trigger but leaves the
three roles: roles belong to the whole cluster and other databases may use
them (drop them by hand with ``DROP ROLE`` once no database needs them).

Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

ROLES = ("crh_admin", "crh_worker", "crh_user")
# Functions the three roles call (EXECUTE is revoked from PUBLIC).
PUBLIC_FUNCTIONS = (
    "crh_queue_counts()",
    "crh_queue_front()",
    "crh_adopt_blob(bigint, text)",
    "crh_blob_readable(bigint)",
    "crh_privileged()",
)
RLS_TABLES = ("inversions", "events", "blobs", "blob_owners", "workers")
TABLES = ("inversions", "events", "blobs", "binary_data", "blob_owners", "workers", "node_settings")
SEQUENCES = ("inversions_id_seq", "events_id_seq", "blobs_id_seq", "workers_id_seq")

# Columns a user may set when registering (db_role, attempt, worker... come from defaults).
USER_INSERT_COLUMNS = (
    "status, sim_type, model_first, username, source_computer, source_path, crh_file, priority, "
    "job_group, threads, timeout_s, max_attempts, sipdir, input_sha256"
)
# Columns a user's own statements change: re-registration, cancel, requeue, priority, retrieval.
USER_UPDATE_COLUMNS = (
    "status, sim_type, model_first, username, crh_file, priority, job_group, threads, timeout_s, "
    "max_attempts, sipdir, datetime_init, input_sha256, datetime_queued, fair_rank, datetime_finished, "
    "lease_expires, tries, exit_code, failure_category, failure_reason, result_sha256, worker_id, downloaded, "
    "datetime_downloaded"
)
# The lifecycle columns a worker writes: claim, renew, complete, fail, release, rescue.
WORKER_UPDATE_COLUMNS = (
    "status, attempt, tries, worker_id, inv_computer, datetime_started, datetime_finished, "
    "datetime_queued, lease_expires, exit_code, failure_category, failure_reason, result_sha256"
)
WORKERS_UPDATE_COLUMNS = (
    "name, host, pid, version, state, jobs, threads, groups, solvers, last_heartbeat, "
    "datetime_stopped, stop_reason, requested"
)
BLOB_SEAL_COLUMNS = "sha256, size, raw_size, n_chunks, complete, datetime_completed"

CREATE_ROLES = """
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['crh_admin', 'crh_worker', 'crh_user'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'cr_queue needs the group role % but % may not create roles', role_name, current_user
                    USING HINT = 'run `crh db upgrade` as a role with CREATEROLE (or a superuser), or have '
                        'one run once: CREATE ROLE crh_admin NOLOGIN; CREATE ROLE crh_worker NOLOGIN; '
                        'CREATE ROLE crh_user NOLOGIN;';
            END;
        END IF;
    END LOOP;
END $$
"""


def _functions(schema: str) -> list[str]:
    # SECURITY DEFINER functions pin their search_path so nobody can slip in look-alike objects.
    path = f"pg_catalog, {schema}, pg_temp"
    return [
        # Who is exempt from the user rules: admins, workers, and the schema owner (or a superuser).
        f"""
        CREATE FUNCTION crh_privileged() RETURNS boolean LANGUAGE sql STABLE
        SET search_path = {path} AS $$
            SELECT pg_has_role('crh_admin', 'USAGE') OR pg_has_role('crh_worker', 'USAGE')
                OR pg_has_role((SELECT relowner FROM pg_class WHERE oid = 'inversions'::regclass), 'USAGE')
        $$
        """,
        # Runs as the caller, so the row security of blobs decides: the single source of truth.
        f"""
        CREATE FUNCTION crh_blob_readable(p_blob_id bigint) RETURNS boolean LANGUAGE plpgsql STABLE
        SET search_path = {path} AS $$
        BEGIN
            RETURN EXISTS (SELECT 1 FROM blobs WHERE id = p_blob_id);
        END $$
        """,
        # A user whose upload turns out to be stored already (another owner's copy,
        # hidden by row security) becomes a co-owner, but only when the bytes it
        # uploaded are the same: the uploader demonstrably has the content, so
        # sharing the stored copy discloses nothing.  A hash alone proves nothing.
        f"""
        CREATE FUNCTION crh_adopt_blob(p_blob_id bigint, p_sha256 text) RETURNS boolean
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = {path} AS $$
        DECLARE
            mine blobs;
            theirs blobs;
            n_mine integer;
            same boolean := true;
            i integer;
        BEGIN
            SELECT * INTO mine FROM blobs WHERE id = p_blob_id;
            IF NOT FOUND OR mine.complete THEN
                RETURN false;
            END IF;
            SELECT * INTO theirs FROM blobs WHERE sha256 = p_sha256 AND complete;
            IF NOT FOUND OR theirs.id = mine.id THEN
                RETURN false;
            END IF;
            SELECT count(*) INTO n_mine FROM binary_data WHERE blob_id = mine.id;
            IF n_mine = theirs.n_chunks THEN
                FOR i IN 0 .. theirs.n_chunks - 1 LOOP
                    SELECT (SELECT data FROM binary_data WHERE blob_id = mine.id AND chunk_no = i)
                         = (SELECT data FROM binary_data WHERE blob_id = theirs.id AND chunk_no = i)
                    INTO same;
                    EXIT WHEN same IS NOT TRUE;
                END LOOP;
            ELSE
                -- Chunked differently (another chunk size): check the hash of the upload itself.
                SELECT encode(sha256(coalesce(string_agg(data, ''::bytea ORDER BY chunk_no), ''::bytea)), 'hex')
                       = p_sha256
                INTO same FROM binary_data WHERE blob_id = mine.id;
            END IF;
            IF same IS NOT TRUE THEN
                RETURN false;
            END IF;
            IF mine.db_role <> theirs.db_role THEN
                INSERT INTO blob_owners (blob_id, db_role) VALUES (theirs.id, mine.db_role)
                ON CONFLICT DO NOTHING;
            END IF;
            RETURN true;
        END $$
        """,
        # Anonymous totals for everyone's status: no names, paths or hashes.
        f"""
        CREATE FUNCTION crh_queue_counts() RETURNS TABLE (status text, job_group text, jobs bigint)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {path} AS $$
            SELECT j.status, j.job_group, count(*) FROM inversions j GROUP BY 1, 2 ORDER BY 1, 2
        $$
        """,
        # Where the queue's front is in the round robin between users (queue.py ranks a
        # new job "never behind the front"), which a user's row security would hide.
        f"""
        CREATE FUNCTION crh_queue_front() RETURNS bigint
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {path} AS $$
            SELECT min(fair_rank) FROM inversions WHERE status = 'queued'
        $$
        """,
        # What a user may do to a job row beyond owning it: no forged lifecycle.
        f"""
        CREATE FUNCTION crh_guard_job() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {path} AS $$
        BEGIN
            IF crh_privileged() THEN
                RETURN NEW;
            END IF;
            IF TG_OP = 'INSERT' THEN
                IF NEW.status NOT IN ('registering', 'queued') THEN
                    RAISE EXCEPTION 'a new job must be registering or queued, not %', NEW.status
                        USING ERRCODE = 'insufficient_privilege';
                END IF;
            ELSE
                IF NEW.status IS DISTINCT FROM OLD.status AND NOT (
                       (OLD.status = 'registering' AND NEW.status = 'queued')
                    OR (OLD.status IN ('registering', 'queued', 'running') AND NEW.status = 'cancelled')
                    OR (OLD.status IN ('failed', 'cancelled') AND NEW.status = 'queued')) THEN
                    RAISE EXCEPTION 'job %: only a worker or an admin may change its status from % to %',
                        OLD.id, OLD.status, NEW.status USING ERRCODE = 'insufficient_privilege';
                END IF;
                IF NEW.result_sha256 IS DISTINCT FROM OLD.result_sha256 AND NEW.result_sha256 IS NOT NULL THEN
                    RAISE EXCEPTION 'job %: only a worker may set its result', OLD.id
                        USING ERRCODE = 'insufficient_privilege';
                END IF;
                IF NEW.worker_id IS DISTINCT FROM OLD.worker_id AND NEW.worker_id IS NOT NULL THEN
                    RAISE EXCEPTION 'job %: only a worker may take it', OLD.id
                        USING ERRCODE = 'insufficient_privilege';
                END IF;
                IF NEW.input_sha256 IS DISTINCT FROM OLD.input_sha256 AND OLD.status <> 'registering' THEN
                    RAISE EXCEPTION 'job %: its input cannot change once it is queued', OLD.id
                        USING ERRCODE = 'insufficient_privilege';
                END IF;
            END IF;
            IF NEW.input_sha256 IS NOT NULL
               AND (TG_OP = 'INSERT' OR NEW.input_sha256 IS DISTINCT FROM OLD.input_sha256)
               AND NOT EXISTS (
                   SELECT 1 FROM blobs b
                   WHERE b.sha256 = NEW.input_sha256 AND b.complete
                     AND (b.db_role = current_user OR EXISTS (
                         SELECT 1 FROM blob_owners o WHERE o.blob_id = b.id AND o.db_role = current_user))) THEN
                RAISE EXCEPTION 'archive % was not uploaded by %', left(NEW.input_sha256, 12), current_user
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'a job''s input must be an archive its owner uploaded (crh_add does that)';
            END IF;
            RETURN NEW;
        END $$
        """,
        # Events of a user's statements must be about that user's jobs.  An AFTER
        # trigger, because the job row may come from the same statement.
        f"""
        CREATE FUNCTION crh_guard_event() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {path} AS $$
        BEGIN
            IF NOT crh_privileged() AND NOT EXISTS (
                SELECT 1 FROM inversions WHERE id = NEW.job_id AND db_role = current_user) THEN
                RAISE EXCEPTION 'job %: not a job of %', NEW.job_id, current_user
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN NULL;
        END $$
        """,
        # Chunks go only into an unsealed blob of the caller's own (COPY cannot use row security).
        f"""
        CREATE FUNCTION crh_guard_chunk() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {path} AS $$
        BEGIN
            IF pg_has_role('crh_admin', 'USAGE')
               OR pg_has_role((SELECT relowner FROM pg_class WHERE oid = 'binary_data'::regclass), 'USAGE') THEN
                RETURN NULL;
            END IF;
            IF NOT EXISTS (SELECT 1 FROM blobs WHERE id = NEW.blob_id AND db_role = current_user AND NOT complete) THEN
                RAISE EXCEPTION 'archive %: not an unfinished upload of %', NEW.blob_id, current_user
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN NULL;
        END $$
        """,
    ]


POLICIES = [
    # --- inversions
    "CREATE POLICY crh_admin_all ON inversions TO crh_admin USING (true) WITH CHECK (true)",
    # Workers see every job (rescue sweeps and the new-row checks of their own updates need
    # it; job metadata is not the secret, the archives are) but change only live ones.
    "CREATE POLICY crh_worker_read ON inversions FOR SELECT TO crh_worker USING (true)",
    "CREATE POLICY crh_worker_update ON inversions FOR UPDATE TO crh_worker "
    "USING (status IN ('queued', 'running')) WITH CHECK (true)",
    # A user's own jobs, owned by the database role that registered them (the column's
    # default); a registration that is never completed may be dropped again.
    "CREATE POLICY crh_user_read ON inversions FOR SELECT TO crh_user USING (db_role = current_user)",
    "CREATE POLICY crh_user_insert ON inversions FOR INSERT TO crh_user WITH CHECK (db_role = current_user)",
    "CREATE POLICY crh_user_update ON inversions FOR UPDATE TO crh_user "
    "USING (db_role = current_user) WITH CHECK (db_role = current_user)",
    "CREATE POLICY crh_user_drop ON inversions FOR DELETE TO crh_user "
    "USING (db_role = current_user AND status = 'registering')",
    # --- events
    "CREATE POLICY crh_admin_all ON events TO crh_admin USING (true) WITH CHECK (true)",
    "CREATE POLICY crh_write_own ON events FOR INSERT TO crh_worker, crh_user WITH CHECK (db_role = current_user)",
    "CREATE POLICY crh_user_read ON events FOR SELECT TO crh_user "
    "USING (EXISTS (SELECT 1 FROM inversions j WHERE j.id = events.job_id))",
    # --- blobs
    "CREATE POLICY crh_admin_all ON blobs TO crh_admin USING (true) WITH CHECK (true)",
    "CREATE POLICY crh_upload ON blobs FOR INSERT TO crh_worker, crh_user "
    "WITH CHECK (db_role = current_user AND NOT complete)",
    "CREATE POLICY crh_seal ON blobs FOR UPDATE TO crh_worker, crh_user "
    "USING (db_role = current_user AND NOT complete) WITH CHECK (db_role = current_user)",
    "CREATE POLICY crh_drop ON blobs FOR DELETE TO crh_worker, crh_user "
    "USING (db_role = current_user AND NOT complete)",
    "CREATE POLICY crh_user_read ON blobs FOR SELECT TO crh_user USING ("
    " db_role = current_user"
    " OR EXISTS (SELECT 1 FROM blob_owners o WHERE o.blob_id = blobs.id AND o.db_role = current_user)"
    " OR EXISTS (SELECT 1 FROM inversions j WHERE j.result_sha256 = blobs.sha256 AND j.db_role = current_user))",
    "CREATE POLICY crh_worker_read ON blobs FOR SELECT TO crh_worker USING ("
    " db_role = current_user"
    " OR EXISTS (SELECT 1 FROM inversions j JOIN workers w ON w.id = j.worker_id"
    "            WHERE j.input_sha256 = blobs.sha256 AND j.status = 'running' AND w.db_role = current_user))",
    # --- blob_owners
    "CREATE POLICY crh_admin_all ON blob_owners TO crh_admin USING (true) WITH CHECK (true)",
    "CREATE POLICY crh_user_own ON blob_owners FOR SELECT TO crh_user USING (db_role = current_user)",
    # --- workers
    "CREATE POLICY crh_admin_all ON workers TO crh_admin USING (true) WITH CHECK (true)",
    "CREATE POLICY crh_read ON workers FOR SELECT TO crh_worker, crh_user USING (true)",
    "CREATE POLICY crh_worker_insert ON workers FOR INSERT TO crh_worker WITH CHECK (db_role = current_user)",
    "CREATE POLICY crh_worker_update ON workers FOR UPDATE TO crh_worker "
    "USING (db_role = current_user) WITH CHECK (db_role = current_user)",
]

GRANTS = [
    f"REVOKE ALL ON {', '.join(TABLES)} FROM PUBLIC",
    # admin: everything on every row
    f"GRANT ALL ON {', '.join(TABLES)} TO crh_admin",
    f"GRANT ALL ON SEQUENCE {', '.join(SEQUENCES)} TO crh_admin",
    # worker
    "GRANT SELECT ON inversions TO crh_worker",
    f"GRANT UPDATE ({WORKER_UPDATE_COLUMNS}) ON inversions TO crh_worker",
    "GRANT INSERT ON events TO crh_worker",
    "GRANT SELECT, INSERT, DELETE ON blobs TO crh_worker",
    f"GRANT UPDATE ({BLOB_SEAL_COLUMNS}) ON blobs TO crh_worker",
    "GRANT INSERT ON binary_data TO crh_worker",
    "GRANT SELECT, INSERT ON workers TO crh_worker",
    f"GRANT UPDATE ({WORKERS_UPDATE_COLUMNS}) ON workers TO crh_worker",
    "GRANT SELECT ON node_settings TO crh_worker",
    "GRANT USAGE ON SEQUENCE events_id_seq, blobs_id_seq, workers_id_seq TO crh_worker",
    # user
    "GRANT SELECT, DELETE ON inversions TO crh_user",
    f"GRANT INSERT ({USER_INSERT_COLUMNS}) ON inversions TO crh_user",
    f"GRANT UPDATE ({USER_UPDATE_COLUMNS}) ON inversions TO crh_user",
    "GRANT SELECT, INSERT ON events TO crh_user",
    "GRANT SELECT, INSERT, DELETE ON blobs TO crh_user",
    f"GRANT UPDATE ({BLOB_SEAL_COLUMNS}) ON blobs TO crh_user",
    "GRANT INSERT ON binary_data TO crh_user",
    "GRANT SELECT ON blob_owners TO crh_user",
    "GRANT SELECT ON workers, node_settings TO crh_user",
    "GRANT USAGE ON SEQUENCE inversions_id_seq, events_id_seq, blobs_id_seq TO crh_user",
    # everyone: the schema version (every command checks it) and the chunk view
    "GRANT SELECT ON alembic_version, blob_chunks TO crh_admin, crh_worker, crh_user",
    # functions: EXECUTE is PUBLIC by default; only the three roles need them
    f"REVOKE ALL ON FUNCTION {', '.join(PUBLIC_FUNCTIONS)} FROM PUBLIC",
    f"GRANT EXECUTE ON FUNCTION {', '.join(PUBLIC_FUNCTIONS)} TO crh_admin, crh_worker, crh_user",
]

TRIGGERS = [
    "CREATE TRIGGER crh_guard_job BEFORE INSERT OR UPDATE ON inversions FOR EACH ROW EXECUTE FUNCTION crh_guard_job()",
    "CREATE TRIGGER crh_guard_event AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION crh_guard_event()",
    "CREATE TRIGGER crh_guard_chunk AFTER INSERT ON binary_data FOR EACH ROW EXECUTE FUNCTION crh_guard_chunk()",
]

FUNCTION_SIGNATURES = (
    "crh_guard_chunk()",
    "crh_guard_event()",
    "crh_guard_job()",
    *PUBLIC_FUNCTIONS,
)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def upgrade() -> None:
    bind = op.get_bind()
    schema = _quote_ident(bind.execute(sa.text("SELECT current_schema()")).scalar_one())
    database = _quote_ident(bind.execute(sa.text("SELECT current_database()")).scalar_one())
    op.execute(CREATE_ROLES)

    # Who uploaded an archive: a user may read its own uploads, and use only them as input.
    op.add_column(
        "blobs", sa.Column("db_role", sa.Text(), nullable=False, server_default=sa.text("current_user"))
    )
    op.create_table(
        "blob_owners",
        sa.Column("blob_id", sa.BigInteger(), nullable=False),
        sa.Column("db_role", sa.Text(), nullable=False),
        sa.Column("datetime_added", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.ForeignKeyConstraint(["blob_id"], ["blobs.id"], ondelete="CASCADE", name="fk_blob_owners_blob_id"),
        sa.PrimaryKeyConstraint("blob_id", "db_role", name="pk_blob_owners"),
    )
    # The row-security checks look jobs up by owner and by archive.
    op.create_index("ix_inversions_db_role", "inversions", ["db_role"])
    op.create_index("ix_inversions_input_sha256", "inversions", ["input_sha256"])
    op.create_index("ix_inversions_result_sha256", "inversions", ["result_sha256"])

    for statement in _functions(schema):
        op.execute(statement)
    op.execute(
        "CREATE VIEW blob_chunks WITH (security_barrier) AS "
        "SELECT blob_id, chunk_no, data FROM binary_data WHERE crh_blob_readable(blob_id)"
    )
    for statement in TRIGGERS:
        op.execute(statement)
    for table in RLS_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    for statement in POLICIES:
        op.execute(statement)
    op.execute(f"GRANT USAGE ON SCHEMA {schema} TO crh_admin, crh_worker, crh_user")
    # Lets an admin revoke CONNECT from PUBLIC (docs/security.md); only the database's owner may grant it.
    if bind.execute(sa.text("SELECT has_database_privilege(current_database(), 'CONNECT WITH GRANT OPTION')")).scalar():
        op.execute(f"GRANT CONNECT ON DATABASE {database} TO crh_admin, crh_worker, crh_user")
    for statement in GRANTS:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    schema = _quote_ident(bind.execute(sa.text("SELECT current_schema()")).scalar_one())
    database = _quote_ident(bind.execute(sa.text("SELECT current_database()")).scalar_one())
    roles = ", ".join(ROLES)
    op.execute(f"REVOKE ALL ON {', '.join(TABLES)}, alembic_version, blob_chunks FROM {roles}")
    op.execute(f"REVOKE ALL ON SEQUENCE {', '.join(SEQUENCES)} FROM {roles}")
    op.execute(f"REVOKE ALL ON SCHEMA {schema} FROM {roles}")
    op.execute(f"REVOKE ALL ON DATABASE {database} FROM {roles}")
    for statement in POLICIES:
        name, table = statement.split()[2], statement.split()[4]
        op.execute(f"DROP POLICY IF EXISTS {name} ON {table}")
    for table in RLS_TABLES:
        if table != "blob_owners":
            op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.execute("DROP TRIGGER IF EXISTS crh_guard_chunk ON binary_data")
    op.execute("DROP TRIGGER IF EXISTS crh_guard_event ON events")
    op.execute("DROP TRIGGER IF EXISTS crh_guard_job ON inversions")
    op.execute("DROP VIEW IF EXISTS blob_chunks")
    for signature in FUNCTION_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
    op.drop_index("ix_inversions_result_sha256", table_name="inversions")
    op.drop_index("ix_inversions_input_sha256", table_name="inversions")
    op.drop_index("ix_inversions_db_role", table_name="inversions")
    op.drop_table("blob_owners")
    op.drop_column("blobs", "db_role")
