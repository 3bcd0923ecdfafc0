"""Entry points: the ``crh`` group and the classic ``crh_*`` commands of cr_hydra."""

from __future__ import annotations

import click

from .. import __version__
from .add import add_command
from .db import db_group
from .demo import demo_command
from .manage import cancel_command, priority_command, requeue_command
from .retrieve import retrieve_command, wait_retrieve_command
from .worker import worker_command
from .status import status_command
from .show import show_command
from .cleanup import cleanup_command
from .workers import node_group, worker_group_for


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cr_queue")
def crh():
    """cr_queue: run CRMod/CRTomo jobs on a pool of nodes through PostgreSQL.

    Typical day: `crh add` in a tree of tomodirs, `crh worker` on the compute
    nodes, `crh retrieve` in the same tree.  `crh demo` shows the whole thing.
    """


crh.add_command(add_command)
crh.add_command(worker_group_for(worker_command))
crh.add_command(retrieve_command)
crh.add_command(wait_retrieve_command)
crh.add_command(db_group)
crh.add_command(demo_command)
crh.add_command(cancel_command)
crh.add_command(requeue_command)
crh.add_command(priority_command)
crh.add_command(status_command)
crh.add_command(show_command)
crh.add_command(cleanup_command)
crh.add_command(node_group)

_settings = {"help_option_names": ["-h", "--help"]}


def _standalone(command: click.Command, name: str):
    def main() -> None:
        command.main(prog_name=name, **_settings)

    return main


crh_add = _standalone(add_command, "crh_add")
crh_worker = _standalone(worker_command, "crh_worker")
crh_retrieve = _standalone(retrieve_command, "crh_retrieve")
crh_wait_retrieve = _standalone(wait_retrieve_command, "crh_wait_retrieve")
crh_cancel = _standalone(cancel_command, "crh_cancel")
crh_status = _standalone(status_command, "crh_status")
crh_cleanup = _standalone(cleanup_command, "crh_cleanup")
