"""The access matrix of docs/security.md, tried cell by cell as each login on real PostgreSQL.

The matrix is read from the page (between its ``matrix:begin`` and ``matrix:end``
markers); for every object of the schema (table, view, function, sequence) and
every action, the test connects as the owner, an admin, a user and a worker
and tries it, in a transaction it rolls back, on a database holding two users'
jobs, archives and events and two workers' rows.  What it observes must be
what the page says, and the page must name every object the schema has.

What a cell means (the same words on the page):

* ``yes``: allowed, on every row;
* ``rows``: allowed, but only on the rows row-level security or a trigger lets
  the login reach (fewer than all, with the data of this test);
* ``cols``: UPDATE allowed on some columns only (listed in the text of the page);
* ``cols, rows``: both;
* ``no``: refused (permission denied).
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, errors, sql

from cr_queue import store
from cr_queue.queries import jobs, roles, workers
from cr_queue.tomodir import synth

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
LOGINS = {"admin": "mx_admin", "user": "mx_alice", "worker": "mx_w1"}
OTHER_USER, OTHER_WORKER = "mx_bob", "mx_w2"
ROLES = ("owner", "admin", "user", "worker")
ACTIONS = {
    "table": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "view": ("SELECT",),
    "function": ("EXECUTE",),
    "sequence": ("USAGE",),
}
ACTOR = jobs.Actor(os_user="t", host="ws", pid=1)


def read_matrix(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``{(object, action): {role: cell}}`` from the markdown table between the markers."""
    block = re.search(r"<!-- matrix:begin -->(.*?)<!-- matrix:end -->", text, re.S)
    assert block, "docs/security.md has no access matrix between <!-- matrix:begin --> and <!-- matrix:end -->"
    rows = [line for line in block.group(1).splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["object", "kind", *ROLES], header
    matrix: dict[tuple[str, str], dict[str, str]] = {}
    kinds: dict[str, str] = {}
    for line in rows[2:]:
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        name, kind, values = cells[0], cells[1], cells[2:]
        kinds[name] = kind
        # A cell holds one word per action of the kind, e.g. "SELECT yes, INSERT no, ...".
        for role, value in zip(ROLES, values):
            for part in value.split(";"):
                action, _, cell = part.strip().partition(" ")
                matrix.setdefault((name, action), {})[role] = cell.strip()
    return matrix


@pytest.fixture(scope="session")
def matrix_logins(template_url: str) -> None:
    with psycopg.connect(template_url, autocommit=True) as owner:
        roles.grant(owner, LOGINS["admin"], roles.ADMIN)
        for name in (LOGINS["user"], OTHER_USER):
            roles.grant(owner, name, roles.USER)
        for name in (LOGINS["worker"], OTHER_WORKER):
            roles.grant(owner, name, roles.WORKER)


@pytest.fixture
def populated(db_url, matrix_logins, tmp_path) -> str:
    """Two users with queued jobs (one running, held by each worker), archives, events, workers, a node setting."""

    def as_(login):
        return psycopg.connect(conninfo.make_conninfo(db_url, user=login), autocommit=True)

    for n, login in enumerate((LOGINS["user"], OTHER_USER)):
        with as_(login) as conn:
            for i in range(2):
                td = synth.make_tomodir(tmp_path / f"{login}{i}", "inv", seed=10 * n + i)
                sha = store.put_tree(conn, store.DATABASE, td).sha256
                new = jobs.NewJob(sim_type="inv", model_first=False, source_path=str(td), crh_file=f"{td}.crh",
                                  username=login, source_computer="ws")
                job_id = jobs.begin_registration(conn, new, ACTOR)
                assert jobs.finish_registration(conn, job_id, sha, ACTOR)
            jobs.begin_registration(conn, jobs.NewJob(sim_type="inv", model_first=False, source_path="/r",
                                                      crh_file="/r.crh", username=login, source_computer="ws"), ACTOR)
    for login in (LOGINS["worker"], OTHER_WORKER):
        with as_(login) as conn:
            wid = workers.register_worker(conn, name=login, host="node", pid=1, version="t", jobs=1, threads=1,
                                          groups=[], solvers={})
            actor = jobs.Actor(os_user="t", host="node", pid=1, worker_id=wid)
            assert jobs.claim(conn, actor=actor, can_mod=True, can_inv=True, lease_s=600) is not None
            conn.execute("INSERT INTO blobs (location) VALUES ('db')")  # an upload under way
    with psycopg.connect(db_url, autocommit=True) as owner:
        owner.execute("INSERT INTO node_settings (host, nice) VALUES ('node', 5)")
        owner.execute("INSERT INTO blob_owners (blob_id, db_role) SELECT min(id), %s FROM blobs", (OTHER_USER,))
    return db_url


def schema_objects(conn) -> dict[str, str]:
    """Every table, view, sequence and callable function of the schema: name -> kind."""
    found = {}
    for name, relkind in conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace"
        " AND c.relkind IN ('r', 'v', 'S')"
    ):
        found[name] = {"r": "table", "v": "view", "S": "sequence"}[relkind]
    for (signature,) in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = current_schema()::regnamespace"
        " AND p.prorettype <> 'trigger'::regtype"
    ):
        found[signature] = "function"
    return found


def _columns(conn, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (table,))]


def _try(conn, statement, params=None) -> tuple[str, int | None]:
    """('ok', rowcount), ('denied', None) or ('refused', None) (another error: a row rule), rolled back.

    A foreign key or NOT NULL error means the statement was allowed: ('ok', None)."""
    try:
        with conn.transaction(force_rollback=True):
            cur = conn.execute(statement, params)
            return "ok", cur.rowcount
    except errors.InsufficientPrivilege as exc:
        return ("denied", None) if "permission denied" in str(exc) else ("refused", None)
    except psycopg.IntegrityError:
        return "ok", None  # allowed; the data's own rules (keys, NOT NULL) stopped it
    except psycopg.DatabaseError:
        return "refused", None


def _extent(outcome: tuple[str, int | None], total: int) -> str:
    state, count = outcome
    if state == "refused" or (state == "ok" and count is not None and count < total):
        return "rows"
    return "yes"


def observe(conn, owner, name: str, kind: str, action: str) -> str:
    ident = sql.Identifier(name)
    if kind in ("table", "view") and action == "SELECT":
        total = owner.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
        outcome = _try(conn, sql.SQL("SELECT 1 FROM {}").format(ident))
        if outcome[0] == "denied":
            return "no"
        return "rows" if outcome[1] < total else "yes"
    if action == "INSERT":
        return "no" if _try(conn, sql.SQL("INSERT INTO {} DEFAULT VALUES").format(ident))[0] == "denied" else "yes"
    if action == "DELETE":
        total = owner.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
        outcome = _try(conn, sql.SQL("DELETE FROM {}").format(ident))
        return "no" if outcome[0] == "denied" else _extent(outcome, total)
    if action == "UPDATE":
        total = owner.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
        columns = _columns(owner, name)
        every = sql.SQL(", ").join(sql.SQL("{0} = {0}").format(sql.Identifier(c)) for c in columns)
        outcome = _try(conn, sql.SQL("UPDATE {} SET {}").format(ident, every))
        if outcome[0] != "denied":
            return _extent(outcome, total)
        for column in columns:
            outcome = _try(conn, sql.SQL("UPDATE {} SET {} = {}").format(ident, sql.Identifier(column), sql.Identifier(column)))
            if outcome[0] != "denied":
                return "cols" if _extent(outcome, total) == "yes" else "cols, rows"
        return "no"
    if action == "EXECUTE":
        function, _, args = name.partition("(")
        types = [t.strip() for t in args.rstrip(")").split(",") if t.strip()]
        nulls = sql.SQL(", ").join(sql.SQL("NULL::" + t) for t in types)
        outcome = _try(conn, sql.SQL("SELECT * FROM {}({})").format(sql.Identifier(function), nulls))
        return "no" if outcome[0] == "denied" else "yes"
    if action == "USAGE":
        return "no" if _try(conn, "SELECT nextval(%s)", (name,))[0] == "denied" else "yes"
    raise AssertionError(f"no probe for {action} on a {kind}")


def test_the_matrix_names_every_object_of_the_schema(db_url):
    matrix = read_matrix(DOC.read_text())
    documented = {name for name, _ in matrix}
    with psycopg.connect(db_url) as conn:
        objects = schema_objects(conn)
    assert sorted(set(objects) - documented) == [], "objects of the schema missing from the matrix"
    assert sorted(documented - set(objects)) == [], "objects in the matrix that the schema does not have"


def test_every_cell_of_the_matrix_holds_for_its_login(populated):
    matrix = read_matrix(DOC.read_text())
    observed: dict[tuple[str, str], dict[str, str]] = {}
    with psycopg.connect(populated, autocommit=True) as owner:
        kinds = schema_objects(owner)
        for role in ROLES:
            url = populated if role == "owner" else conninfo.make_conninfo(populated, user=LOGINS[role])
            with psycopg.connect(url, autocommit=True) as conn:
                for name, kind in sorted(kinds.items()):
                    for action in ACTIONS[kind]:
                        observed.setdefault((name, action), {})[role] = observe(conn, owner, name, kind, action)
    differences = [
        f"{name} {action} as {role}: the page says {matrix.get((name, action), {}).get(role)!r}, "
        f"the database does {cell!r}"
        for (name, action), cells in sorted(observed.items())
        for role, cell in cells.items()
        if matrix.get((name, action), {}).get(role) != cell
    ]
    assert differences == [], "\n".join(differences)


def render(observed: dict[tuple[str, str], dict[str, str]], kinds: dict[str, str]) -> str:
    """The matrix as the page writes it (how it was first written: from what the database does)."""
    lines = ["| object | kind | " + " | ".join(ROLES) + " |", "|---|---|" + "---|" * len(ROLES)]
    for name, kind in sorted(kinds.items(), key=lambda item: (list(ACTIONS).index(item[1]), item[0])):
        cells = ["; ".join(f"{a} {observed[(name, a)][role]}" for a in ACTIONS[kind]) for role in ROLES]
        lines.append(f"| `{name}` | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_every_security_definer_function_pins_its_search_path(db_url):
    """A SECURITY DEFINER function runs as the owner: its names must resolve only in pg_catalog
    and the schema, with pg_temp last, so no login can slip in a look-alike table or function."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
            " WHERE p.pronamespace = current_schema()::regnamespace AND p.prosecdef ORDER BY 1"
        ).fetchall()
    assert len(rows) >= 12
    for name, config in rows:
        paths = [c for c in config or [] if c.startswith("search_path=")]
        assert paths, f"{name} has no search_path of its own"
        parts = [p.strip() for p in paths[0].split("=", 1)[1].split(",")]
        assert parts[0] == "pg_catalog" and parts[-1] == "pg_temp" and len(parts) == 3, (name, parts)
