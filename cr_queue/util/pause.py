"""Named pause points, so fault tests can kill a command at an exact step.

Setting ``CRH_PAUSE_AT=<name>`` makes the process announce ``crh-paused <name>``
on stderr when it reaches that point and then wait there until it is killed,
or, where ``CRH_PAUSE_UNTIL=<path>`` is set too, until that file exists: a test
can then break something under the paused process (its database connection)
and let it go on, to see what it does next.  Without the variables a pause
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys
import time


def pause_point(name: str) -> None:
    if os.environ.get("CRH_PAUSE_AT") != name:
        return
    sys.stderr.write(f"crh-paused {name}\n")
    sys.stderr.flush()
    release = os.environ.get("CRH_PAUSE_UNTIL")
    while not (release and os.path.exists(release)):
        time.sleep(0.05 if release else 3600)
