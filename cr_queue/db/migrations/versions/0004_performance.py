"""Performance: where archive bytes are, the queue front index, autovacuum of the hot tables.

* ``blobs.location``: ``'db'`` (chunks in ``binary_data``) or ``'dir'`` (a file
  in the shared-directory store, ``[store] path``); the row stays either way,
  so jobs keep their foreign keys and admins their sizes.
* ``ix_inversions_queued_rank``: the front of the round robin (``min(fair_rank)``
  of queued jobs, read at every registration by ``crh_queue_front()``) was a
  scan of every queued job; with this index it is one index probe.
* The NOTIFY of a newly queued job carries its id (``"<id> <group>"``):
  PostgreSQL folds identical notifications of one transaction into one,
  so a requeue of 100 jobs used to wake one slot per worker, and a worker
  woke every idle slot for it; now each job wakes one slot.
* Autovacuum and fillfactor of the tables every job updates several times
  (``inversions``, ``workers``: heartbeats, leases) and of ``events``: dead
  claim-index entries slow the claim until vacuum removes them, and the
  default scale factor (20 %) lets 20,000 of them pile up in a 100,000-job
  table.  Space left free on each page keeps lease and heartbeat updates
  HOT (no index writes).  See docs/performance.md for the measurements.

Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"

STORAGE = {
    "inversions": {
        "fillfactor": "80",
        "autovacuum_vacuum_scale_factor": "0.01",
        "autovacuum_vacuum_threshold": "1000",
        "autovacuum_analyze_scale_factor": "0.02",
        "autovacuum_vacuum_insert_scale_factor": "0.05",
    },
    "workers": {
        "fillfactor": "50",
        "autovacuum_vacuum_scale_factor": "0",
        "autovacuum_vacuum_threshold": "500",
    },
    "events": {
        "autovacuum_analyze_scale_factor": "0.02",
        "autovacuum_vacuum_insert_scale_factor": "0.05",
    },
    "blobs": {
        "autovacuum_vacuum_scale_factor": "0.05",
    },
}


NOTIFY_WITH_ID = """
CREATE OR REPLACE FUNCTION crh_notify_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crh_jobs', NEW.id::text || ' ' || coalesce(NEW.job_group, ''));
    RETURN NULL;
END $$
"""

NOTIFY_GROUP_ONLY = """
CREATE OR REPLACE FUNCTION crh_notify_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crh_jobs', coalesce(NEW.job_group, ''));
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.execute(NOTIFY_WITH_ID)
    op.add_column("blobs", sa.Column("location", sa.Text(), nullable=False, server_default=sa.text("'db'")))
    op.create_check_constraint("location", "blobs", "location IN ('db', 'dir')")
    op.create_index(
        "ix_inversions_queued_rank", "inversions", ["fair_rank"], postgresql_where=sa.text("status = 'queued'")
    )
    for table, options in STORAGE.items():
        settings = ", ".join(f"{key} = {value}" for key, value in options.items())
        op.execute(f"ALTER TABLE {table} SET ({settings})")


def downgrade() -> None:
    op.execute(NOTIFY_GROUP_ONLY)
    for table, options in STORAGE.items():
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(options)})")
    op.drop_index("ix_inversions_queued_rank", table_name="inversions")
    op.drop_constraint("location", "blobs", type_="check")
    op.drop_column("blobs", "location")
