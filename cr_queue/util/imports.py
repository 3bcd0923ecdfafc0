"""Importing what a command needs only once it needs it, with the garbage collector held off.

A small crh_add or crh_retrieve is over in a fraction of a second, so its
start-up is much of what it costs, and start-up is mostly imports.  In a
console script's own process the cyclic garbage collector is held off while
modules load and what they made is then frozen (``gc.freeze``): it lives
until exit, so the collections that the many allocations of an import
trigger, and the one at interpreter shutdown, would only walk it again in
vain.  The services use :func:`load_module` for their heavy parts too
(crh_add imports the database driver only after it has forked its packers).
"""

from __future__ import annotations

import gc
import importlib
from typing import Any

# Set by the console scripts (cli/entry.py): the process is then a command's own
# and its garbage collector ours to tune.  A program that imports cr_queue (the
# tests, a Python caller of crh.main) keeps its collector as it is.
_command_process = False


def load_module(name: str, package: str | None = None) -> Any:
    """Import a module; in a command's process with the cyclic GC held off and the result frozen."""
    if not _command_process:
        return importlib.import_module(name, package)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name, package)
    finally:
        # What the imports made lives until exit: keep later collections from walking it.
        gc.freeze()
        if enabled:
            gc.enable()


def command_process() -> bool:
    """Whether this process is a console script's own (then it may, for one, fork)."""
    return _command_process


def own_process() -> None:
    """Called first by every console script."""
    global _command_process
    _command_process = True
