"""The console scripts: each imports only the command it runs.

A small crh_add or crh_retrieve is over in a fraction of a second, so its
start-up is much of what it costs, and start-up is mostly imports.  Hence:

* ``crh_add`` imports cli/add.py and what that needs, not the worker, the
  admin commands or the embedded server (cli/main.py's ``crh`` group loads
  its subcommands the same lazy way);
* the cyclic garbage collector is held off while the modules load and the
  objects they made are then frozen (``gc.freeze``): they live until exit,
  so the collections that the many allocations of an import trigger, and
  the one at interpreter shutdown, would only walk them again in vain.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable
from typing import Any

HELP_OPTIONS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}

# Set by the console scripts below: the process is then a command's own and
# its garbage collector ours to tune.  A program that imports the commands
# (the tests, a Python caller of crh.main) keeps its collector as it is.
_command_process = False


def load(spec: str) -> Any:
    """``.module:attribute`` relative to cr_queue.cli, imported by :func:`load_module`."""
    module, _, attribute = spec.partition(":")
    return getattr(load_module(module, __package__), attribute)


def load_module(name: str, package: str | None = None) -> Any:
    """Import a module; in a command's process with the cyclic GC held off and the
    result frozen (a command imports what it needs only once it needs it: crh_add
    forks its helpers before it imports the database driver)."""
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


def _own_process() -> None:
    global _command_process
    _command_process = True


def _standalone(spec: str, prog: str) -> Callable[[], None]:
    def main() -> None:
        _own_process()
        load(spec).main(prog_name=prog, **HELP_OPTIONS)

    main.__name__ = main.__qualname__ = prog
    main.__doc__ = f"The `{prog}` console script."
    return main


def crh() -> None:
    """The `crh` console script: the group, which loads only the subcommand it runs."""
    _own_process()
    load(".main:crh").main()


crh_add = _standalone(".add:add_command", "crh_add")
crh_worker = _standalone(".worker:worker_command", "crh_worker")
crh_retrieve = _standalone(".retrieve:retrieve_command", "crh_retrieve")
crh_wait_retrieve = _standalone(".retrieve:wait_retrieve_command", "crh_wait_retrieve")
crh_cancel = _standalone(".manage:cancel_command", "crh_cancel")
crh_status = _standalone(".status:status_command", "crh_status")
crh_cleanup = _standalone(".cleanup:cleanup_command", "crh_cleanup")
