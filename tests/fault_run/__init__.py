"""The randomized fault run (issue 14): real PostgreSQL, real workers, real faults.

plan.py draws everything from one printed seed (the tree's behaviours, the
faults and their timing); world.py is the run's own cluster, workers, proxy,
scratch filesystems and tree; check.py states the invariants checked at the
end; run.py drives a run.  ``scripts/fault-run`` is the long run and
tests/test_fault_run.py the short one in the suite.
"""
