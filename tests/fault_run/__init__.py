"""The randomized fault run (issue 14): real PostgreSQL, real workers, real faults.

plan.py draws everything from one printed seed (the tree's behaviours, the
faults and their timing); world.py is the run's own cluster, workers, proxy,
scratch filesystems and tree; check.py states the invariants checked at the
end; run.py drives a run.

    scripts/fault-run --minutes 30 --seed N [--without KIND,...]    # the long run
    .venv/bin/python -m pytest -q tests/test_fault_run.py -s           # the short one (about 3 min)

CRH_FAULT_RUN_SEED=N repeats the short run's plan, CRH_FAULT_RUN_MINUTES
sets its length, CRH_FAULT_RUN_WITHOUT=KIND,... leaves some of the fault
kinds out while hunting a defect (plan.SWITCHABLE; by default every kind is in).  The
full_scratch kind mounts a tmpfs: run as root.  A failing run keeps its
files (logs of every worker and command, the tree, the stand-in's records)
and says where.
"""
