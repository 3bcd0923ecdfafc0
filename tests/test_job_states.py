"""JobStatus is the one list of job states: every state the SQL names, and every state the
database allows, is one of its values (cr_queue/job_states.py)."""

from __future__ import annotations

import ast
import re
from importlib import resources

import psycopg
import pytest

from cr_queue.job_states import ENDED, PENDING, RETRIEVABLE, JobStatus

_LITERAL = re.compile(r"'([^']*)'")
# Where SQL names a job's state: compared with a status column, or a CASE assigned to one.
_COMPARED = re.compile(r"\bstatus\s*(?:=|<>|!=)\s*'([^']*)'", re.I)
_LISTED = re.compile(r"\bstatus\s+(?:NOT\s+)?IN\s*\(([^)]*)\)", re.I)
_CASE = re.compile(r"\bstatus\s*=\s*CASE\b(.*?)\bEND\b", re.I | re.S)
_CASE_RESULT = re.compile(r"\b(?:THEN|ELSE)\s+'([^']*)'", re.I)


def status_literals(sql: str) -> list[str]:
    """The states a statement names (quoted literals in status comparisons, IN lists and CASEs)."""
    found = _COMPARED.findall(sql)
    for listed in _LISTED.findall(sql):
        found += _LITERAL.findall(listed)
    for case in _CASE.findall(sql):
        found += _CASE_RESULT.findall(case)
    return found


def _sql_files() -> dict[str, str]:
    """The query layer's .sql files and the migrations' (since 0005 the lifecycle's statements
    are the database's functions, written in the migration's .sql file)."""
    found = {}
    for package in ("cr_queue.queries", "cr_queue.db.migrations.versions"):
        folder = resources.files(package)
        found.update({p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.name.endswith(".sql")})
    return found


def test_the_extractor_finds_states_in_every_form():
    sql = (
        "UPDATE inversions SET status = CASE WHEN x THEN 'failed' ELSE 'queud' END "
        "WHERE j.status = 'running' AND status IN ('registering', 'queued') AND status <> 'cancelld'"
    )
    assert sorted(status_literals(sql)) == sorted(["failed", "queud", "running", "registering", "queued", "cancelld"])


def test_every_state_the_query_layer_names_is_a_job_status():
    named = {name: status_literals(text) for name, text in _sql_files().items()}
    unknown = {name: sorted(set(found) - set(JobStatus)) for name, found in named.items() if set(found) - set(JobStatus)}
    assert unknown == {}
    # Not blind: the lifecycle's statements name every state.
    assert set(named["jobs.sql"]) | set(named["0005_job_integrity.sql"]) == set(JobStatus)
    assert sum(len(found) for found in named.values()) >= 30


def test_the_database_allows_exactly_the_job_states(db_url):
    with psycopg.connect(db_url) as conn:
        checks = [
            row[0]
            for row in conn.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'inversions'::regclass AND contype = 'c'"
            )
        ]
    (definition,) = [c for c in checks if c.startswith("CHECK ((status = ANY")]
    assert set(_LITERAL.findall(definition)) == set(JobStatus)


def test_groupings():
    assert set(PENDING) | set(ENDED) == set(JobStatus) and not set(PENDING) & set(ENDED)
    assert set(RETRIEVABLE) < set(ENDED)
    assert JobStatus("queued") == "queued" and f"{JobStatus.QUEUED}" == "queued"


def test_job_states_imports_nothing_of_cr_queue():
    """Every layer imports it, so it may import none (and status must not pay for SQLAlchemy)."""
    tree = ast.parse(resources.files("cr_queue").joinpath("job_states.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [m for m in imported if m.startswith("cr_queue") or m == "sqlalchemy"] == []


@pytest.mark.parametrize("name", ["retrieve", "api", "status", "db.schema", "queries.jobs"])
def test_no_other_list_of_states(name):
    """The former copies are gone: no tuple of two or more state names in the services and layers."""
    module = __import__(f"cr_queue.{name}", fromlist=["_"])
    tree = ast.parse(open(module.__file__).read())
    states = set(JobStatus)
    lists = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set))
        and sum(isinstance(e, ast.Constant) and e.value in states for e in node.elts) >= 2
    ]
    assert lists == []
