"""The short randomized fault run (issue 14) in the suite: about three minutes of real faults.

tests/fault_run/ is the run; scripts/fault-run the long one.  The seed is
random (printed first; CRH_FAULT_RUN_SEED=N repeats a run's plan) and every
fault kind is on (CRH_FAULT_RUN_WITHOUT=KIND,... leaves some out while
hunting a defect).  Whatever is on is really injected: the test asserts each enabled kind happened, then
that every invariant of tests/fault_run/check.py held.
"""

from __future__ import annotations

import os
import random

from .fault_run.plan import Plan, switches_from_env
from .fault_run.run import FaultRun

MINUTES = float(os.environ.get("CRH_FAULT_RUN_MINUTES", "2"))


def test_short_fault_run_loses_duplicates_and_corrupts_nothing():
    seed = int(os.environ.get("CRH_FAULT_RUN_SEED") or random.SystemRandom().randrange(1, 10**6))
    plan = Plan(seed, MINUTES, switches_from_env(), short=True)
    run = FaultRun(plan, say=lambda text: print(text, flush=True))
    ok, line, findings = run.run()
    injected = run.tally.counts
    missing = [kind for kind in plan.enabled() if not injected[kind]]
    assert not missing, f"seed {seed}: fault kinds never injected: {missing} ({line})"
    assert len(run.world.tomodirs) >= 2 * plan.batch_size, line
    assert ok, f"seed {seed}: {line}\n" + "\n".join(map(str, findings[:40]))
