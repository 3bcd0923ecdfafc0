"""The migrations after 0004 keep their statements in a .sql file beside them (named blocks,
as the query layer's): this reads that file and runs its blocks in the order a migration names.

One place for it, so that each migration holds only what is its own: its revision, and
which blocks its upgrade and downgrade run (``migration``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from alembic import op

from cr_queue.queries import loader


def load(migration: str) -> loader.Statements:
    """The named statements of the .sql file beside the migration module ``migration`` (its __file__)."""
    sql = Path(migration).with_suffix(".sql")
    return loader.parse(sql.read_text(encoding="utf-8"), sql.name)


def run(statements: Mapping[str, str], names: Iterable[str]) -> None:
    """Run these blocks, in this order, in the migration's transaction."""
    for name in names:
        op.execute(statements[name])


def migration(
    module_file: str, *, upgrade: Sequence[str], downgrade: Sequence[str]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The ``upgrade`` and ``downgrade`` functions alembic calls for the migration ``module_file``.

    Each runs its blocks of the .sql file beside the module, in the order given; a name
    ``MIGRATION:BLOCK`` is a block of an earlier migration's file (``0005_job_integrity:...``).
    The files are read now, at import, and every name is checked against them, so that a
    misspelt block fails when alembic loads the migrations, not half-way through an upgrade.
    """
    own = load(module_file)
    statements: dict[str, str] = {}
    for name in (*upgrade, *downgrade):
        # "0005_job_integrity:block": a block of an earlier migration's file, for a downgrade
        # that brings back that migration's definition instead of repeating it.
        other, _, block = name.rpartition(":")
        source = load(str(Path(module_file).with_name(f"{other}.py"))) if other else own
        if block in source:
            statements[name] = source[block]
    unknown = [name for name in (*upgrade, *downgrade) if name not in statements]
    if unknown:
        raise loader.QueryFileError(f"{Path(module_file).with_suffix('.sql').name} has no block {', '.join(unknown)}")

    def run_upgrade() -> None:
        run(statements, upgrade)

    def run_downgrade() -> None:
        run(statements, downgrade)

    return run_upgrade, run_downgrade
