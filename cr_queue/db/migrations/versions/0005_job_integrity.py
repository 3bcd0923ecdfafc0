"""The job's state machine lives in the database: no login can crash others, pose as someone,
jump the queue, finish what it does not hold, or read what is not its own (issue 15).

* Users and workers change jobs only through SECURITY DEFINER functions
  (``crh_finish_registrations``, ``crh_cancel``, ``crh_requeue``,
  ``crh_set_priority``, ``crh_mark_downloaded`` for a job's owner;
  ``crh_claim``, ``crh_renew``, ``crh_complete``, ``crh_fail``,
  ``crh_release``, ``crh_release_node_failure``, ``crh_rescue`` for workers),
  each checking the caller, the
  transition and the fence (worker login, worker id, attempt) and writing the
  event in the same statement.  Their ``search_path`` is pinned.  No login but
  the owner updates a state column: the column grants of 0003 are revoked; a
  user keeps only the settings of a job still registering (trigger
  ``crh_guard_registration``).
* Constraints: a finished job has a result; priority within the documented
  range (-1,000,000..1,000,000); ranks and counters cannot go negative or grow
  towards an overflow.  Rows that break them (forged before this migration)
  are repaired first: a finished job without result becomes failed with an
  event.
* Fair share is ranked by login (``db_role``), not by the ``username`` a
  client writes; ``username`` stays cr_hydra's informational column, fixed at
  registration.
* A worker login reads an archive only while it is the input of a job one of
  its workers holds, or its own unfinished upload (no more reading results).

The statements are in 0005_job_integrity.sql beside this file.

Create Date: 2026-12-07
"""

from cr_queue.db.migrations import sql_steps

revision = "0005"
down_revision = "0004"

# alembic's two entry points: each runs these blocks of 0005_job_integrity.sql, in this order.
upgrade, downgrade = sql_steps.migration(
    __file__,
    upgrade=(
        "repair_finished_without_result",
        "repair_ranges",
        "add_constraints",
        "login_rank_index",
        "drop_user_rank_index",
        "caller_functions",
        "registration_functions",
        "owner_functions",
        "worker_functions",
        "release_node_failure_function",
        "guard_registration",
        "pin_search_path",
        "grants",
        "policies",
    ),
    downgrade=(
        "undo_policies",
        "undo_grants",
        "drop_functions",
        "user_rank_index",
        "drop_login_rank_index",
        "drop_constraints",
    ),
)
