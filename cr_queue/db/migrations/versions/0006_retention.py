"""Retention of retrieved results: when a job's archives were purged.

``crh_cleanup`` purges the input and result archives of jobs retrieved more
than ``keep_retrieved`` ago and keeps their rows and events for provenance.
A purged job no longer refers to its archives (the hashes let go are in its
``purged`` event), so the foreign keys from ``inversions`` to ``blobs`` stay
as they were and still guarantee that every archive a job refers to exists;
``datetime_purged`` says that, and when, the archives went (``crh show``).
A finished job keeps its result unless it was purged (the constraint of 0005
admits that case), and the purge is the function ``crh_purge_archives``
(SECURITY DEFINER, admins and the owner), so an admin login needs no update
grant on the job's columns.  The statements are in 0006_retention.sql.

Create Date: 2026-12-07
"""

from cr_queue.db.migrations import sql_steps

revision = "0006"
down_revision = "0005"

# alembic's two entry points: each runs these blocks of 0006_retention.sql, in this order.
upgrade, downgrade = sql_steps.migration(
    __file__,
    upgrade=("add_purged_column", "finished_has_result_or_purged", "purge_function"),
    downgrade=("drop_purge_function", "finished_has_result", "drop_purged_column"),
)
