"""A node is a host and its scratch directory, for the cap on node-failure releases.

``crh_release_node_failure`` (0005) fails a job as ``node_failures`` once
three distinct nodes could not run it.  It counted worker processes, so a
worker restarted on the same broken node (its service manager, a SLURM
pilot, the long fault run's replacements) counted again, and a job that only
one node could not run failed.  Workers now name their scratch directory in
the release's detail; releases are counted by host and scratch directory.
The statements are in 0007_node_failure_places.sql.

Create Date: 2026-12-07
"""

from cr_queue.db.migrations import sql_steps

revision = "0007"
down_revision = "0006"

# alembic's two entry points: each runs these blocks of 0007_node_failure_places.sql, in this order;
# the downgrade brings back 0005's definition from 0005's file.
upgrade, downgrade = sql_steps.migration(
    __file__,
    upgrade=("count_nodes", "pin_search_path"),
    downgrade=("0005_job_integrity:release_node_failure_function", "pin_search_path"),
)
