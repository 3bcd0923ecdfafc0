"""The layers the tree shows, kept by a test (read from the source, no database).

(a) SQL lives in the query layer only: no module outside ``cr_queue/queries/``
    holds a string constant that is an SQL statement, or calls a cursor's or
    connection's ``execute``/``executemany``/``copy``/``stream``.  Exempt: the
    migrations 0001..0004, history applied to live databases.  A new migration
    keeps its statements in a .sql file beside it, read with
    ``queries.loader.parse`` and run with alembic's ``op.execute``, both
    through ``db/migrations/sql_steps.py``.
(b) Layers only point down: no module imports a module of a higher layer,
    function-level imports included.

    cli > services (top-level modules, worker/, web/) > store/ > queries/ > db/
        > helpers (tomodir/, solvers/, util/, config.py, job_states.py,
                   and queries/loader.py: the .sql format, plain text parsing)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cr_queue"

# --------------------------------------------------------------------- ranks

RANKS = {"helpers": 0, "db": 1, "queries": 2, "store": 3, "services": 4, "cli": 5}
PACKAGES = {
    "cli": "cli",
    "worker": "services",
    "web": "services",
    "store": "store",
    "queries": "queries",
    "db": "db",
    "tomodir": "helpers",
    "solvers": "helpers",
    "util": "helpers",
}
# Top-level modules are services unless named here.
HELPER_MODULES = {"__init__", "config", "job_states"}
# The format of the .sql files: the loader parses text and imports nothing of cr_queue,
# so it ranks with the helpers; a migration (db/) reads the .sql file beside it with it.
HELPER_MODULES_ELSEWHERE = {"cr_queue.queries.loader"}

# Migrations already applied to live databases: history, kept as written.
HISTORY = {f"cr_queue/db/migrations/versions/{name}.py" for name in
           ("0001_initial", "0002_operations", "0003_roles_rls", "0004_performance")}


def rank_of(module: str) -> str:
    """The layer of a module named ``cr_queue.x.y``."""
    parts = module.split(".")
    assert parts[0] == "cr_queue", module
    if len(parts) == 1 or parts[1] in HELPER_MODULES or module in HELPER_MODULES_ELSEWHERE:
        return "helpers"
    if (PACKAGE / parts[1]).is_dir():
        if parts[1] not in PACKAGES:
            raise AssertionError(f"cr_queue/{parts[1]}/ has no layer: give it one in tests/test_layers.py PACKAGES")
        return PACKAGES[parts[1]]
    return "services"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, here: str | None = None) -> list[tuple[int, str]]:
    """Every cr_queue module ``path`` (the module ``here``) imports, anywhere in the file: (line, module)."""
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if _is_module(full) else base))
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "cr_queue" or name.startswith("cr_queue.")]


@dataclass(frozen=True)
class Crossing:
    where: str
    line: int
    layer: str
    imported: str
    imported_layer: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.layer} imports {self.imported} ({self.imported_layer})"


def upward_imports(path: Path, here: str | None = None) -> list[Crossing]:
    here = here or module_name(path)
    mine = rank_of(here)
    where = here.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
    return [
        Crossing(where, line, mine, name, rank_of(name))
        for line, name in imports_of(path, here)
        if RANKS[rank_of(name)] > RANKS[mine]
    ]


# ----------------------------------------------------------------------- SQL

# A string that starts as a statement does (case aside); prose does not look like this.
_STATEMENT = re.compile(
    r"""^\s*(?:
        SELECT\s.*\bFROM\b | SELECT\s+[\w.]+\s*\( | SELECT\s+\d |
        INSERT\s+INTO\s | UPDATE\s+\w+(?:\s+(?:AS\s+)?\w+)?\s+SET\s | DELETE\s+FROM\s |
        WITH\s+(?:RECURSIVE\s+)?\w+\s+AS\s*(?:(?:NOT\s+)?MATERIALIZED\s*)?\( |
        (?:CREATE|ALTER|DROP)\s+(?:OR\s+REPLACE\s+|UNIQUE\s+)?
            (?:TABLE|INDEX|ROLE|USER|DATABASE|FUNCTION|TRIGGER|VIEW|EXTENSION|POLICY|SCHEMA|SEQUENCE|TYPE)\b |
        (?:GRANT|REVOKE)\s.*\b(?:TO|FROM|ON)\s |
        (?:UN)?LISTEN\s+\w+\s*;?\s*$ | NOTIFY\s+\w+ |
        SET\s+(?:LOCAL\s+|SESSION\s+)?(?:\w+\s*(?:=|\bTO\b)|TRANSACTION\b|ROLE\b) |
        (?:VACUUM|ANALYZE|TRUNCATE|CHECKPOINT|BEGIN|COMMIT|ROLLBACK)\b\s*\w*\s*;?\s*$ |
        COPY\s+\w+.*\b(?:FROM|TO)\s+(?:STDIN|STDOUT)\b |
        DO\s+\$ | EXPLAIN\s
    )""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
EXECUTING = {"execute", "executemany", "copy", "stream"}


def is_statement(text: str) -> bool:
    return bool(_STATEMENT.match(text))


@dataclass
class Finding:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def sql_outside_the_query_layer(path: Path, where: str | None = None) -> list[Finding]:
    """SQL statements as string constants (f-strings: their literal parts) and executing calls."""
    if where is None:
        where = str(path.relative_to(PACKAGE.parent)) if path.is_relative_to(PACKAGE.parent) else str(path)
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    modules = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    in_fstring = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    migration = "/migrations/versions/" in where or where.endswith("/migrations/sql_steps.py")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values)
            if is_statement(text):
                found.append(Finding(f"{where}:{node.lineno}", f"SQL in an f-string: {text.strip()[:60]!r}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and id(node) not in in_fstring and is_statement(node.value):
                found.append(Finding(f"{where}:{node.lineno}", f"SQL in a string: {node.value.strip()[:60]!r}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EXECUTING:
            receiver = node.func.value
            if isinstance(receiver, ast.Name) and receiver.id in modules:
                continue  # shutil.copy, copy.copy: a module's function, not a cursor's method
            if node.func.attr in ("copy", "stream") and not node.args:
                continue  # dict.copy(): a cursor's copy and stream take the statement
            if migration and ast.unparse(receiver) == "op" and node.func.attr == "execute":
                continue  # alembic's op.execute of a new migration's block (sql_steps.run): its SQL is in a .sql file
            found.append(Finding(f"{where}:{node.lineno}", f"{ast.unparse(node.func)}(...) sends SQL"))
    return sorted(found, key=lambda f: int(f.where.rsplit(":", 1)[1]))


def _package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _exempt_from_sql_rule(path: Path) -> bool:
    where = str(path.relative_to(PACKAGE.parent))
    return where.startswith("cr_queue/queries/") or where in HISTORY


# --------------------------------------------------------------------- tests


def test_no_sql_outside_the_query_layer():
    findings = [
        str(f) for path in _package_modules() if not _exempt_from_sql_rule(path) for f in sql_outside_the_query_layer(path)
    ]
    assert findings == [], "SQL belongs in cr_queue/queries/<subject>.sql, run by a wrapper beside it:\n" + "\n".join(findings)


def test_the_sql_rule_sees_the_query_layer_and_the_history():
    """The scan is not blind: it finds the statements where they are allowed to be."""
    queries = [f for p in (PACKAGE / "queries").glob("*.py") for f in sql_outside_the_query_layer(p)]
    history = [f for w in HISTORY for f in sql_outside_the_query_layer(PACKAGE.parent / w)]
    assert len(queries) >= 40, queries
    assert len(history) >= 20, history


@pytest.mark.parametrize(
    "source, found",
    [
        ('Q = "SELECT id FROM inversions WHERE status = %s"\n', "SQL in a string"),
        ('Q = """\n    select count(*) from inversions"""\n', "SQL in a string"),
        ('Q = "UPDATE inversions j SET priority = 1"\n', "SQL in a string"),
        ('Q = "WITH u AS (DELETE FROM t RETURNING id) SELECT 1"\n', "SQL in a string"),
        ('Q = "SET synchronous_commit = off"\n', "SQL in a string"),
        ('Q = "SELECT txid_current()"\n', "SQL in a string"),
        ('Q = "LISTEN crh_jobs"\n', "SQL in a string"),
        ('Q = "CREATE DATABASE crh"\n', "SQL in a string"),
        ('Q = f"GRANT {g} TO {u}"\n', "SQL in an f-string"),
        ("def f(conn, q):\n    conn.execute(q)\n", "conn.execute(...) sends SQL"),
        ("def f(cur, q):\n    with cur.copy(q) as c: pass\n", "cur.copy(...) sends SQL"),
        ("def f(self, q):\n    self._conn.executemany(q, [])\n", "self._conn.executemany(...) sends SQL"),
    ],
)
def test_the_sql_rule_catches(tmp_path, source, found):
    path = tmp_path / "bad.py"
    path.write_text(source)
    assert [f.what for f in sql_outside_the_query_layer(path)][0].startswith(found)


@pytest.mark.parametrize(
    "source",
    [
        'M = "run it as the database owner or a member of crh_admin (GRANT crh_admin TO NAME)"\n',
        'M = "Select the jobs to requeue by id, tomodir or .crh file"\n',
        'H = "Seconds between polls when no NOTIFY arrives."\n',
        'def f(d):\n    """SELECT in a docstring is prose."""\n    return d.copy()\n',
        "import shutil\ndef f(a, b):\n    shutil.copy(a, b)\n",
    ],
)
def test_the_sql_rule_leaves_prose_and_other_calls_alone(tmp_path, source):
    path = tmp_path / "fine.py"
    path.write_text(source)
    assert sql_outside_the_query_layer(path) == []


def test_layers_only_point_down():
    problems = [str(crossing) for path in _package_modules() for crossing in upward_imports(path)]
    assert problems == [], "a lower layer imports a higher one:\n" + "\n".join(problems)


def test_the_import_rule_reads_every_kind_of_import(tmp_path):
    fake = tmp_path / "probe.py"
    fake.write_text(
        "from cr_queue.tomodir import archive\n"
        "def f():\n"
        "    from cr_queue.queries import jobs\n"
        "    import cr_queue.cli.main\n"
        "    from .. import status\n"
        "    importlib.import_module('cr_queue.worker')\n"
    )
    problems = upward_imports(fake, "cr_queue.db.probe")
    assert [str(p).split(": ", 1)[1] for p in problems] == [
        "db imports cr_queue.queries.jobs (queries)",
        "db imports cr_queue.cli.main (cli)",
        "db imports cr_queue.status (services)",
        "db imports cr_queue.worker (services)",
    ]


def test_the_helpers_elsewhere_import_nothing_of_cr_queue():
    for name in HELPER_MODULES_ELSEWHERE:
        path = PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py")
        assert imports_of(path) == [], f"{name} ranks with the helpers only while it imports nothing of cr_queue"


def test_a_migration_may_read_its_sql_file_with_the_loader(tmp_path):
    migration = tmp_path / "0099_example.py"
    migration.write_text(
        "from pathlib import Path\n"
        "from alembic import op\n"
        "from cr_queue.queries import loader\n"
        "SQL = loader.parse(Path(__file__).with_suffix('.sql').read_text(), '0099_example.sql')\n"
        "def upgrade():\n"
        "    op.execute(SQL.grant_something)\n"
    )
    assert upward_imports(migration, "cr_queue.db.migrations.versions.example") == []
    assert sql_outside_the_query_layer(migration, where="cr_queue/db/migrations/versions/0099_example.py") == []


def test_every_package_has_a_layer():
    for entry in PACKAGE.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            rank_of(f"cr_queue.{entry.name}")
