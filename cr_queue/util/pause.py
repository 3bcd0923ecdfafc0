"""Named pause points, so fault tests can kill a command at an exact step.

Setting ``CRH_PAUSE_AT=<name>`` makes the process announce ``crh-paused <name>``
on stderr when it reaches that point and then wait there until it is killed.
Without the variable a pause point costs one dictionary lookup.
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
    while True:
        time.sleep(3600)
