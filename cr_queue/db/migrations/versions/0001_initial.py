"""Initial schema: inversions, blobs, binary_data, workers, events.

Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("sha256", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("raw_size", sa.BigInteger(), nullable=True),
        sa.Column("n_chunks", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("complete", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("datetime_created", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("datetime_completed", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("NOT complete OR sha256 IS NOT NULL", name="ck_blobs_complete_has_sha256"),
        sa.PrimaryKeyConstraint("id", name="pk_blobs"),
        sa.UniqueConstraint("sha256", name="uq_blobs_sha256"),
    )
    op.create_table(
        "binary_data",
        sa.Column("blob_id", sa.BigInteger(), nullable=False),
        sa.Column("chunk_no", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["blob_id"], ["blobs.id"], ondelete="CASCADE", name="fk_binary_data_blob_id"),
        sa.PrimaryKeyConstraint("blob_id", "chunk_no", name="pk_binary_data"),
    )
    # Chunks are zstd already: spare PostgreSQL a futile pglz attempt on every row.
    op.execute("ALTER TABLE binary_data ALTER COLUMN data SET STORAGE EXTERNAL")
    op.create_table(
        "workers",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("db_role", sa.Text(), nullable=False, server_default=sa.text("current_user")),
        sa.Column("state", sa.Text(), nullable=False, server_default=sa.text("'running'")),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("groups", postgresql.ARRAY(sa.Text()), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("solvers", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("datetime_started", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("datetime_stopped", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('running', 'draining', 'stopped')", name="ck_workers_state"),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )
    op.create_table(
        "inversions",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default=sa.text("'registering'")),
        sa.Column("sim_type", sa.Text(), nullable=False),
        sa.Column("model_first", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("db_role", sa.Text(), nullable=False, server_default=sa.text("current_user")),
        sa.Column("source_computer", sa.Text(), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("crh_file", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("job_group", sa.Text(), nullable=True),
        sa.Column("threads", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("timeout_s", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("tries", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("max_attempts", sa.Integer(), nullable=False, server_default=sa.text("3")),
        sa.Column("worker_id", sa.BigInteger(), nullable=True),
        sa.Column("inv_computer", sa.Text(), nullable=True),
        sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("input_sha256", sa.Text(), nullable=True),
        sa.Column("result_sha256", sa.Text(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("failure_category", sa.Text(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("datetime_init", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("datetime_queued", sa.DateTime(timezone=True), nullable=True),
        sa.Column("datetime_started", sa.DateTime(timezone=True), nullable=True),
        sa.Column("datetime_finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("downloaded", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("datetime_downloaded", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('registering', 'queued', 'running', 'finished', 'failed', 'cancelled')",
            name="ck_inversions_status",
        ),
        sa.CheckConstraint("sim_type IN ('mod', 'inv')", name="ck_inversions_sim_type"),
        sa.CheckConstraint("threads >= 1", name="ck_inversions_threads"),
        sa.CheckConstraint("max_attempts >= 1", name="ck_inversions_max_attempts"),
        sa.ForeignKeyConstraint(["worker_id"], ["workers.id"], ondelete="SET NULL", name="fk_inversions_worker_id"),
        sa.ForeignKeyConstraint(["input_sha256"], ["blobs.sha256"], name="fk_inversions_input_sha256"),
        sa.ForeignKeyConstraint(["result_sha256"], ["blobs.sha256"], name="fk_inversions_result_sha256"),
        sa.PrimaryKeyConstraint("id", name="pk_inversions"),
    )
    op.create_index(
        "ix_inversions_claim",
        "inversions",
        [sa.text("priority DESC"), "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index("ix_inversions_running", "inversions", ["worker_id"], postgresql_where=sa.text("status = 'running'"))
    op.create_index("ix_inversions_source", "inversions", ["source_computer", "source_path"])
    op.create_index("ix_inversions_finished", "inversions", ["inv_computer", "datetime_finished"])
    op.create_index("ix_inversions_status", "inversions", ["status"])
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("datetime", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("db_role", sa.Text(), nullable=False, server_default=sa.text("current_user")),
        sa.Column("os_user", sa.Text(), nullable=True),
        sa.Column("host", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("worker_id", sa.BigInteger(), nullable=True),
        sa.Column("detail", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.ForeignKeyConstraint(["job_id"], ["inversions.id"], ondelete="CASCADE", name="fk_events_job_id"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_job_id", "events", ["job_id"])
    # Wake idle workers whenever a job becomes claimable, whichever path put it there
    # (crh_add, a rescue sweep, an admin's UPDATE in psql).
    op.execute(
        """
        CREATE FUNCTION crh_notify_queued() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('crh_jobs', coalesce(NEW.job_group, ''));
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER crh_notify_queued
        AFTER INSERT OR UPDATE OF status ON inversions
        FOR EACH ROW WHEN (NEW.status = 'queued')
        EXECUTE FUNCTION crh_notify_queued()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS crh_notify_queued ON inversions")
    op.execute("DROP FUNCTION IF EXISTS crh_notify_queued()")
    op.drop_table("events")
    op.drop_table("inversions")
    op.drop_table("workers")
    op.drop_table("binary_data")
    op.drop_table("blobs")
