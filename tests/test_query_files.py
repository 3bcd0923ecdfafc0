"""The query layer's .sql files: every block named, described and non-empty (cr_queue/queries/loader.py)."""

from __future__ import annotations

from importlib import resources

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
