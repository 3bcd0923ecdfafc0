"""Shared fixtures: one throwaway PostgreSQL cluster per test session, a fresh database per test.

The cluster is started by the suite itself (never a server someone started by
hand).  Each test gets its own database, cloned from a template that already
carries the migrated schema, so tests cannot see each other's jobs.

The suite leaves the machine as it found it (tests/hygiene.py): every
temporary file of the session, pytest's own tmp_path included, lives under
one session directory in /tmp that is removed at the end; a test that needs
an unprivileged OS user or traverse permission on directories above the
checkout gets them from :func:`unprivileged_user` / :func:`traverse`, which
undo them; and the session fails if /tmp, the modes of /root and of the
directories above the interpreter and the checkout, or the system's users
and groups differ at the end from the start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from cr_queue.db import migrate
from cr_queue.db.embedded import PORT, Cluster

from . import hygiene

REPO = Path(__file__).resolve().parents[1]
SHARED_EXAMPLES = REPO.parent / "shared" / "examples" / "tomodirs.tar.gz"
TEMPLATE = "crh_template"


def pytest_configure(config: pytest.Config) -> None:
    """Before any test makes a temp file: the session directory, and the host as found."""
    if not hasattr(config, "workerinput"):
        config._crh_host = hygiene.start_session()
    # A suite started in the background by a shell without job control (`cmd &` in a
    # script, nohup) inherits SIGINT ignored, and so would every command it starts: the
    # Ctrl-C tests then send a SIGINT nobody hears and wait for ever (seen running .ci/run
    # so).  Handled here, SIGINT is back to its default in every child at exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config: pytest.Config) -> str | None:
    """The pgbouncer the PgBouncer tests run against (tests/pgbouncer.py), or that they will skip."""
    from . import pgbouncer as bouncers

    if not bouncers.BINARY.exists():
        return f"pgbouncer: {bouncers.BINARY} missing, tests/test_pgbouncer.py will skip"
    return f"pgbouncer: {bouncers.version()} ({bouncers.BINARY})"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture is torn down: remove the session directory, then compare the host."""
    state = getattr(session.config, "_crh_host", None)
    if state is None:
        return
    problems = hygiene.finish_session(state)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "the test session changed the machine (restored where it could be):\n  " + "\n  ".join(problems)
        if reporter is not None:
            reporter.write_sep("=", "host changed", red=True)
            reporter.write_line(text)
        else:
            print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def unprivileged_user():
    """An OS account that is not root, for tests that switch to one (root only).

    ``nobody`` where the system has it; otherwise a system user made for this
    test and deleted after it, so /etc/passwd is as it was."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    with hygiene.unprivileged_user() as user:
        yield user


@pytest.fixture
def remove_new_users():
    """The account cr_queue itself creates (the embedded server's crh-embedded), deleted after the test if it made it.

    Request it before the fixtures that start servers as that user: fixtures
    are torn down in reverse, so the servers are stopped first."""
    import pwd

    from cr_queue.db.embedded.server_user import FALLBACK_USER

    before = {entry.pw_name for entry in pwd.getpwall()}
    yield
    if FALLBACK_USER not in before and FALLBACK_USER in {entry.pw_name for entry in pwd.getpwall()}:
        hygiene.remove_user(FALLBACK_USER)


@pytest.fixture
def traverse():
    """``traverse(user, *paths)``: let ``user`` pass through every directory above ``paths`` for this test only.

    cr_queue's interpreter or checkout may sit under /root (0700); a test
    running cr_queue as another user needs the search bit there, and gets it
    back off at teardown, whatever the order of tests."""
    with hygiene.traverse_grants() as grant:
        yield grant


def _url(cluster: Cluster, dbname: str) -> str:
    return conninfo.make_conninfo(cluster.url, dbname=dbname)


@pytest.fixture(scope="session")
def pg_cluster() -> Cluster:
    # Not under pytest's basetemp: pytest prunes old basetemps, and a concurrent
    # session would delete this one's data directory under the running server.
    home = Path(tempfile.mkdtemp(prefix="crh-test-pg-"))
    # Durability settings off: a test cluster is thrown away, and it saves minutes.
    cluster = Cluster(
        home / "data",
        extra_conf={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    cluster.start()
    yield cluster
    cluster.stop(mode="immediate")
    shutil.rmtree(home, ignore_errors=True)


@contextmanager
def throwaway_server(prefix: str, extra_conf: Mapping[str, str]) -> Iterator[tuple[Cluster, str]]:
    """A PostgreSQL server of one test's own and a migrated database on it: (cluster, url).

    For tests that set what the session's cluster must not have (max_connections,
    the WAL writer's pace) or stop the server under it; stopped and removed after."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = Cluster(home / "data", extra_conf=dict(extra_conf))
    cluster.start()
    try:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = _url(cluster, name)
        migrate.upgrade(url)
        yield cluster, url
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template_url(pg_cluster: Cluster) -> str:
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    url = _url(pg_cluster, TEMPLATE)
    migrate.upgrade(url)
    return url


@pytest.fixture
def db_url(pg_cluster: Cluster, template_url: str) -> str:
    """A fresh, migrated database of its own for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
    yield _url(pg_cluster, name)
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_db_url(pg_cluster: Cluster) -> str:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _url(pg_cluster, name)
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def conn(db_url: str):
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def script(name: str) -> str:
    """Path of an installed console script (the suite runs the real commands)."""
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not os.path.exists(found):
        pytest.fail(f"console script {name} not installed: run `pip install -e .` first")
    return found


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the real commands against this test's database."""
    return commands_env(db_url, tmp_path)


def commands_env(db_url: str, home: Path) -> dict[str, str]:
    """The real commands against ``db_url`` with the stand-in solvers; no config but what ``home`` holds."""
    env = dict(os.environ)
    for key in ("CRH_CONFIG", "CRH_CRMOD", "CRH_CRTOMO", "CRH_STANDIN_FAIL", "CRH_STANDIN_SLEEP", "CRH_PAUSE_AT", "CRH_PAUSE_UNTIL"):
        env.pop(key, None)
    env.update(
        {
            "CRH_DATABASE_URL": db_url,
            "CRH_CRMOD": script("crh_standin_crmod"),
            "CRH_CRTOMO": script("crh_standin_crtomo"),
            "CRH_SYSTEM_CONFIG": str(home / "no-system-config.toml"),
            "XDG_CONFIG_HOME": str(home / "xdg-config"),
            "NO_COLOR": "1",
        }
    )
    return env


def sql_rows(db_url: str, query, params=None) -> list[tuple] | None:
    """One statement on a connection of its own (autocommit): its rows, or None for a statement without any."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def run(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300, check: int | None = 0):
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory) -> Path:
    """The real example tomodirs from ../shared, unpacked; skipped where ../shared is absent."""
    if not SHARED_EXAMPLES.exists():
        pytest.skip("../shared/examples/tomodirs.tar.gz is not beside this checkout")
    target = tmp_path_factory.mktemp("examples")
    subprocess.run(["tar", "-xzf", str(SHARED_EXAMPLES), "-C", str(target)], check=True)
    return target


@pytest.fixture
def lab(tmp_path: Path, cli_env: dict[str, str], db_url: str):
    """One fault test's world (tests/faults.py): its tree, workers and invariant check."""
    from .faults import Lab

    world = Lab(tmp_path, dict(cli_env), db_url)
    yield world
    world.cleanup()


@pytest.fixture(scope="session")
def pgbouncer(pg_cluster: Cluster):
    """Debian's pgbouncer in transaction pooling mode in front of the session's cluster (tests/pgbouncer.py)."""
    from . import pgbouncer as bouncers

    try:
        bouncer = bouncers.start(pg_cluster)
    except bouncers.PgBouncerMissing as exc:
        pytest.skip(f"no PgBouncer to test against: {exc}")
    print(f"\npgbouncer under test: {bouncer.version} on 127.0.0.1:{bouncer.port}, pool_mode = transaction (log {bouncer.log})")
    try:
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(bouncer.home, ignore_errors=True)


@pytest.fixture
def pooled_env(cli_env: dict[str, str], db_url: str, pgbouncer) -> dict[str, str]:
    """The real commands against this test's database through pgbouncer, with CRH_DATABASE_POOLER=transaction."""
    return {**cli_env, "CRH_DATABASE_URL": pgbouncer.url(db_url), "CRH_DATABASE_POOLER": "transaction"}


@pytest.fixture
def proxy(pg_cluster: Cluster):
    """A freezable TCP proxy in front of the test cluster's Unix socket (tests/faults.py)."""
    from .faults import FreezableProxy

    p = FreezableProxy(pg_cluster.socket_dir / f".s.PGSQL.{PORT}")
    yield p
    p.close()
