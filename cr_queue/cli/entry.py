"""The console scripts: each imports only the command it runs.

A small crh_add or crh_retrieve is over in a fraction of a second, so its
start-up is much of what it costs, and start-up is mostly imports.  Hence:

* ``crh_add`` imports cli/add.py and what that needs, not the worker, the
  admin commands or the embedded server (cli/main.py's ``crh`` group loads
  its subcommands the same lazy way);
* the cyclic garbage collector is held off while the modules load, and
  what they made is frozen (util/imports.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cr_queue.util.imports import load_module, own_process

HELP_OPTIONS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def load(spec: str) -> Any:
    """``.module:attribute`` relative to cr_queue.cli, imported by :func:`load_module`."""
    module, _, attribute = spec.partition(":")
    return getattr(load_module(module, __package__), attribute)


def _standalone(spec: str, prog: str) -> Callable[[], None]:
    def main() -> None:
        own_process()
        load(spec).main(prog_name=prog, **HELP_OPTIONS)

    main.__name__ = main.__qualname__ = prog
    main.__doc__ = f"The `{prog}` console script."
    return main


def crh() -> None:
    """The `crh` console script: the group, which loads only the subcommand it runs."""
    own_process()
    load(".main:crh").main()


crh_add = _standalone(".add:add_command", "crh_add")
crh_worker = _standalone(".worker:worker_command", "crh_worker")
crh_retrieve = _standalone(".retrieve:retrieve_command", "crh_retrieve")
crh_wait_retrieve = _standalone(".retrieve:wait_retrieve_command", "crh_wait_retrieve")
crh_cancel = _standalone(".manage:cancel_command", "crh_cancel")
crh_status = _standalone(".status:status_command", "crh_status")
crh_cleanup = _standalone(".cleanup:cleanup_command", "crh_cleanup")
