"""The migrations after 0004 keep their statements in a .sql file beside them (named blocks,
as the query layer's): this reads that file and runs its blocks in the order a migration names.

One place for it, so that each migration holds only what is its own: its revision, and
which blocks its upgrade and downgrade run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from alembic import op

from cr_queue.queries import loader


def load(migration: str) -> loader.Statements:
    """The named statements of the .sql file beside the migration module ``migration`` (its __file__)."""
    sql = Path(migration).with_suffix(".sql")
    return loader.parse(sql.read_text(encoding="utf-8"), sql.name)


def run(statements: loader.Statements, names: Iterable[str]) -> None:
    """Run these blocks, in this order, in the migration's transaction."""
    for name in names:
        op.execute(statements[name])
