"""Retention of retrieved results: when a job's archives were purged.

``crh_cleanup`` purges the input and result archives of jobs retrieved more
than ``keep_retrieved`` ago and keeps their rows and events for provenance.
A purged job no longer refers to its archives (the hashes let go are in its
``purged`` event), so the foreign keys from ``inversions`` to ``blobs`` stay
as they were and still guarantee that every archive a job refers to exists;
``datetime_purged`` says that, and when, the archives went (``crh show``).

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
# rechain: down_revision becomes "0005" at merge
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inversions", sa.Column("datetime_purged", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("inversions", "datetime_purged")
