"""The query layer's .sql files: every block named, described and non-empty (cr_queue/queries/loader.py)."""

from __future__ import annotations

import re
from importlib import resources

import psycopg
import pytest

from cr_queue.queries import loader


def _files():
    return sorted(p.name for p in resources.files("cr_queue.queries").iterdir() if p.name.endswith(".sql"))


def test_blocks_are_parsed_with_their_descriptions():
    text = (
        "-- The file's own comment.\n\n"
        "-- name: first\n-- What the first one does,\n-- over two lines.\nSELECT 1;\n\n"
        "-- name: second\n-- The second.\nSELECT %(x)s\n  FROM t\n"
    )
    parsed = loader.parse(text, "example.sql")
    assert parsed.first == "SELECT 1"
    assert parsed["second"] == "SELECT %(x)s\n  FROM t"
    assert [s.description for s in parsed] == ["What the first one does, over two lines.", "The second."]
    with pytest.raises(AttributeError, match="example.sql has no statement named 'third'"):
        parsed.third


@pytest.mark.parametrize(
    "text, problem",
    [
        ("SELECT 1", "no '-- name:' block"),
        ("-- name: a\nSELECT 1", "no description"),
        ("-- name: a\n-- A.\n", "is empty"),
        ("-- name: a\n-- A.\nSELECT 1\n-- name: a\n-- Again.\nSELECT 2", "defined twice"),
    ],
)
def test_malformed_files_are_refused(text, problem):
    with pytest.raises(loader.QueryFileError, match=problem):
        loader.parse(text, "bad.sql")


@pytest.mark.parametrize("name", _files())
def test_every_query_file_of_the_package_loads(name):
    statements = loader.load(name.removesuffix(".sql"))
    assert list(statements), f"{name} holds no statement"


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
# The statements composed with psycopg.sql: their {names} are identifiers (cr_queue/queries/roles.py).
_IDENTIFIERS = re.compile(r"\{(\w+)\}")


def _as_server_statement(text: str) -> str:
    """psycopg's %(name)s placeholders as the server's $n, {identifier} slots filled in."""
    numbers: dict[str, int] = {}
    text = _PLACEHOLDER.sub(lambda m: f"${numbers.setdefault(m[1], len(numbers) + 1)}", text)
    return _IDENTIFIERS.sub(lambda m: f'"probe_{m[1]}"', text).replace("%%", "%")


def _statements() -> list[loader.Statement]:
    return [s for name in _files() for s in loader.load(name.removesuffix(".sql"))]


def parse_problems(conn: psycopg.Connection, statements: list[loader.Statement]) -> list[str]:
    """What the server says about each statement it cannot parse and analyse (nothing runs)."""
    problems = []
    for statement in statements:
        result = conn.pgconn.prepare(b"", _as_server_statement(statement.sql).encode())
        if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
            problems.append(f"{statement.name}: {result.error_message.decode().strip()}")
    return problems


def test_every_statement_parses_against_the_schema(db_url):
    """The server parses and analyses each statement against the migrated schema: a typo, a
    missing column or a parameter whose type cannot be inferred fails here, even in a
    statement no other test happens to run."""
    statements = _statements()
    assert len(statements) >= 60
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert parse_problems(conn, statements) == []
        broken = loader.parse("-- name: broken\n-- A typo.\nSELECT stauts FROM inversions WHERE id = %(id)s", "x.sql")
        assert "stauts" in parse_problems(conn, list(broken))[0]
