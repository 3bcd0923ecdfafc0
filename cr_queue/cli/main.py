"""Entry points: the ``crh`` group and the classic ``crh_*`` commands of cr_hydra.

The console scripts themselves live in cli/entry.py.  The group loads each
subcommand when it is used (click's lazy-loading pattern), so ``crh add``
imports the add command, not the worker, the embedded server or the admin
commands; ``crh --help`` loads them all to show their short help.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import click

from cr_queue import __version__
from cr_queue.cli.entry import crh_add, crh_cancel, crh_cleanup, crh_retrieve, crh_status, crh_wait_retrieve, crh_worker, load

__all__ = [
    "crh",
    "crh_add",
    "crh_cancel",
    "crh_cleanup",
    "crh_retrieve",
    "crh_status",
    "crh_wait_retrieve",
    "crh_worker",
]


class _LazyCommands(MutableMapping[str, click.Command]):
    """A group's ``commands``: names known at once, each command imported on first use.

    Being the group's own mapping (not only ``get_command``/``list_commands``
    overrides) keeps ``group.commands[name]`` working for whoever reads it.
    """

    def __init__(self, specs: dict[str, str | Callable[[], click.Command]]) -> None:
        self._specs = dict(specs)
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            spec = self._specs[name]
            command = load(spec) if isinstance(spec, str) else spec()
            if not isinstance(command, click.Command) or command.name != name:
                raise RuntimeError(f"crh {name}: {spec!r} is not the click command {name!r}")
            self._loaded[name] = command
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._specs[name] = lambda: command
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._specs[name]
        self._loaded.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


class LazyGroup(click.Group):
    """A click group whose subcommands are ``".module:attribute"`` specs (or factories) until used."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str | Callable[[], click.Command]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lazy = _LazyCommands(lazy_subcommands or {})
        for name, command in self.commands.items():
            lazy[name] = command
        self.commands = lazy


def _worker_group() -> click.Command:
    """``crh worker``: the daemon, plus list/drain/stop (cli/workers.py)."""
    return load(".workers:worker_group_for")(load(".worker:worker_command"))


@click.group(
    cls=LazyGroup,
    lazy_subcommands={
        "add": ".add:add_command",
        "worker": _worker_group,
        "retrieve": ".retrieve:retrieve_command",
        "wait-retrieve": ".retrieve:wait_retrieve_command",
        "db": ".db:db_group",
        "demo": ".demo:demo_command",
        "cancel": ".manage:cancel_command",
        "requeue": ".manage:requeue_command",
        "priority": ".manage:priority_command",
        "status": ".status:status_command",
        "show": ".show:show_command",
        "cleanup": ".cleanup:cleanup_command",
        "node": ".workers:node_group",
        "web": ".web:web_command",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="cr_queue")
def crh():
    """cr_queue: run CRMod/CRTomo jobs on a pool of nodes through PostgreSQL.

    Typical day: `crh add` in a tree of tomodirs, `crh worker` on the compute
    nodes, `crh retrieve` in the same tree.  `crh demo` shows the whole thing.
    """
