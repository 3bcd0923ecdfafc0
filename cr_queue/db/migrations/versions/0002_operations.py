"""Operations: fair share, sipdir grouping, remote control of workers, per-host node settings.

Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # Round robin between users within a priority: a user's n-th waiting job gets rank n.
    op.add_column("inversions", sa.Column("fair_rank", sa.BigInteger(), nullable=False, server_default=sa.text("0")))
    op.drop_index("ix_inversions_claim", table_name="inversions")
    op.create_index(
        "ix_inversions_claim",
        "inversions",
        [sa.text("priority DESC"), "fair_rank", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_inversions_user_rank",
        "inversions",
        ["username", "fair_rank"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.add_column("inversions", sa.Column("sipdir", sa.Text(), nullable=True))
    op.create_index("ix_inversions_sipdir", "inversions", ["sipdir"], postgresql_where=sa.text("sipdir IS NOT NULL"))
    # What an admin asked a worker to do ('drain' or 'stop'); the worker reads it with its heartbeat.
    op.add_column("workers", sa.Column("requested", sa.Text(), nullable=True))
    op.create_check_constraint("requested", "workers", "requested IN ('drain', 'stop')")
    op.create_table(
        "node_settings",
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("nice", sa.Integer(), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=True),
        sa.Column("threads", sa.Integer(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("datetime_updated", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("host", name="pk_node_settings"),
    )


def downgrade() -> None:
    op.drop_table("node_settings")
    op.drop_column("workers", "requested")
    op.drop_index("ix_inversions_sipdir", table_name="inversions")
    op.drop_column("inversions", "sipdir")
    op.drop_index("ix_inversions_user_rank", table_name="inversions")
    op.drop_index("ix_inversions_claim", table_name="inversions")
    op.drop_column("inversions", "fair_rank")
    op.create_index(
        "ix_inversions_claim",
        "inversions",
        [sa.text("priority DESC"), "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
