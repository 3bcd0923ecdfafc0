"""Reading the named statements of the query layer's ``.sql`` files.

Every SQL statement cr_queue sends lives in a ``.sql`` file beside the
Python wrapper that runs it, one file per subject (``jobs.sql``,
``blobs.sql``, ...), so that a statement reads whole where it is written and
an admin can copy it into psql.  A file is a series of blocks::

    -- name: claim
    -- Take the best queued job this worker can run, in one short transaction.
    WITH next AS (
        ...
    )
    UPDATE ...

The ``-- name:`` line opens a block, the comment lines right after it are its
description (at least one: a statement nobody explained is a defect), and
everything up to the next ``-- name:`` line is the statement, parameters as
psycopg's ``%(name)s`` placeholders.  Files are read once per process, when
the wrapper module is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_BLOCK = re.compile(r"^-- name: *(?P<name>[a-z][a-z0-9_]*) *\n", re.M)


class QueryFileError(Exception):
    """A ``.sql`` file of the query layer is malformed (a bug in cr_queue, found by the tests)."""


@dataclass(frozen=True)
class Statement:
    name: str
    description: str
    sql: str

    def __str__(self) -> str:
        return self.sql


class Statements:
    """The named statements of one ``.sql`` file: ``STATEMENTS.claim`` or ``STATEMENTS["claim"]``.

    Attribute access returns the SQL text itself (what ``execute`` takes); a
    name that is not in the file fails at once with the file's name, so a typo
    surfaces on the first test that runs the wrapper, not as a server error.
    """

    def __init__(self, source: str, statements: dict[str, Statement]) -> None:
        self._source = source
        self._statements = statements

    def __getattr__(self, name: str) -> str:
        return self[name]

    def __getitem__(self, name: str) -> str:
        try:
            return self._statements[name].sql
        except KeyError:
            raise AttributeError(f"{self._source} has no statement named {name!r}") from None

    def __iter__(self):
        return iter(self._statements.values())

    def __contains__(self, name: object) -> bool:
        return name in self._statements

    @property
    def source(self) -> str:
        return self._source


def parse(text: str, source: str) -> Statements:
    """The blocks of one file's text; a header before the first block is the file's own comment."""
    statements: dict[str, Statement] = {}
    matches = list(_BLOCK.finditer(text))
    if not matches:
        raise QueryFileError(f"{source}: no '-- name:' block")
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end]
        description: list[str] = []
        lines = body.splitlines()
        while lines and lines[0].startswith("--"):
            description.append(lines.pop(0)[2:].strip())
        sql = "\n".join(lines).strip()
        name = match["name"]
        if not description or not description[0]:
            raise QueryFileError(f"{source}: statement {name!r} has no description line after its name")
        if not sql:
            raise QueryFileError(f"{source}: statement {name!r} is empty")
        if name in statements:
            raise QueryFileError(f"{source}: statement {name!r} is defined twice")
        statements[name] = Statement(name, " ".join(description), sql.rstrip(";").rstrip())
    return Statements(source, statements)


def load(subject: str) -> Statements:
    """The statements of ``cr_queue/queries/<subject>.sql``."""
    path = resources.files("cr_queue.queries").joinpath(f"{subject}.sql")
    return parse(path.read_text(encoding="utf-8"), f"cr_queue/queries/{subject}.sql")
