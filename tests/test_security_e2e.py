"""The real commands run as real database roles: two scientists, a compute node, and secrets.

Each command gets ``CRH_DATABASE_URL`` with ``user=NAME`` (over the test
cluster's Unix socket), exactly what a scientist's config file holds.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import conninfo, sql

from cr_queue.queries import roles
from cr_queue.tomodir import synth

from .conftest import run, script
from .test_security_roles import ALICE, BOB, NODE, logins, url_as  # noqa: F401  (fixture)


def _env(cli_env: dict[str, str], url: str) -> dict[str, str]:
    return {**cli_env, "CRH_DATABASE_URL": url}


def _psql(url: str, query: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", query],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _results(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("inv/inv.ctr") if "***finished***" in p.read_text())


def test_scientists_and_a_node_through_the_commands(db_url, logins, cli_env, tmp_path):
    alice, bob, node = (_env(cli_env, url_as(db_url, n)) for n in (ALICE, BOB, NODE))
    tree = tmp_path / "alice"
    synth.make_tree(tree, n_inv=2, n_mod=1)
    added = json.loads(run([script("crh_add"), "--json"], alice, cwd=tree).stdout)["added"]
    ids = [str(a["job_id"]) for a in added]
    assert len(ids) == 3

    # bob can neither cancel nor reprioritise alice's jobs, nor see them with psql
    proc = run([script("crh_cancel"), *ids], bob, check=1)
    assert all(f"job {i}:" in proc.stderr for i in ids) and "Traceback" not in proc.stderr
    run([script("crh"), "priority", "100", *ids], bob, check=1)
    bob_url = url_as(db_url, BOB)
    assert _psql(bob_url, "SELECT count(*) FROM inversions").stdout.strip() == "0"
    assert _psql(bob_url, "SELECT count(*) FROM events").stdout.strip() == "0"
    assert _psql(bob_url, "DELETE FROM inversions").stdout.strip() == "DELETE 0"
    denied = _psql(bob_url, "SELECT data FROM binary_data LIMIT 1")
    assert denied.returncode != 0 and "permission denied" in denied.stderr
    # but the anonymous totals everyone may see
    assert _psql(bob_url, "SELECT sum(jobs) FROM crh_queue_counts()").stdout.strip() == "3"

    # the compute node runs them
    report = json.loads(run([script("crh_worker"), "-q", "--json"], node).stdout)
    assert report["finished"] == 3

    # bob, even with alice's .crh files in his hands, retrieves nothing and changes nothing
    proc = run([script("crh_retrieve")], bob, cwd=tree, check=1)
    assert proc.stderr.count("not in the database") == 3
    assert _results(tree) == [] and len(list(tree.rglob("*.crh"))) == 3
    # alice gets everything
    proc = run([script("crh_retrieve"), "--json"], alice, cwd=tree)
    assert len(json.loads(proc.stdout)["retrieved"]) == 3
    assert len(_results(tree)) == 2 and list(tree.rglob("*.crh")) == []


def test_a_scientist_cancels_own_jobs(db_url, logins, cli_env, tmp_path):
    alice = _env(cli_env, url_as(db_url, ALICE))
    synth.make_tree(tmp_path, n_inv=2)
    run([script("crh_add")], alice, cwd=tmp_path)
    proc = run([script("crh_cancel"), str(tmp_path)], alice)
    assert proc.stdout.count("cancelled job") == 2
    run([script("crh_retrieve")], alice, cwd=tmp_path)
    assert list(tmp_path.rglob("*.crh")) == []


@pytest.fixture
def secret_logins(pg_cluster, db_url):
    """A user and a node whose URLs carry a password (trust auth: libpq sends it nowhere, which is fine here)."""
    password = "PwLeak" + secrets.token_hex(8)
    names = {"user": "sec_pw_user", "node": "sec_pw_node"}
    with psycopg.connect(db_url, autocommit=True) as conn:
        for kind, name in names.items():
            roles.grant(conn, name, roles.USER if kind == "user" else roles.WORKER)
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password))
            )
    params = conninfo.conninfo_to_dict(db_url)
    url = (
        f"postgresql://{names['user']}:{password}@/{params['dbname']}"
        f"?host={quote(params['host'], safe='')}&port={params.get('port', '5432')}"
    )
    node_conninfo = conninfo.make_conninfo(db_url, user=names["node"], password=password)
    return password, url, node_conninfo


def test_no_password_in_output_logs_control_files_or_database(db_url, cli_env, tmp_path, secret_logins):
    password, url, node_conninfo = secret_logins
    assert password in url and password in node_conninfo
    user, node = _env(cli_env, url), _env(cli_env, node_conninfo)
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_inv=2, n_mod=1)
    debug = ["--log-level", "debug"]
    outputs = []

    def cmd(args, env, check=0, cwd=tree):
        proc = run(args, env, cwd=cwd, check=check)
        outputs.append((" ".join(map(str, args)), proc.stdout + proc.stderr))
        return proc

    cmd([script("crh_add"), *debug], user)
    cmd([script("crh_add"), *debug, "--json", "--force"], user)
    cmd([script("crh"), "status", *debug], user)
    cmd([script("crh"), "status", "--json", *debug], user)
    cmd([script("crh_worker"), "-q", *debug], node)
    cmd([script("crh_retrieve"), *debug], user)
    cmd([script("crh_retrieve"), "--json", *debug], user)
    cmd([script("crh"), "db", "status", *debug], user)
    cmd([script("crh"), "db", "url"], user)
    cmd([script("crh"), "db", "grant-user", "sec_someone"], user, check=2)
    # errors that name the database: unknown database, unreachable server, bad port
    fresh = tmp_path / "fresh"
    synth.make_tree(fresh, n_inv=1)
    for broken in (
        url.replace("/t_", "/nosuchdb_"),
        url.replace("host=", "host=%2Fnonexistent"),
        url.replace("port=5432", "port=notaport"),
        node_conninfo.replace("port=", "port=notaport"),
    ):
        cmd([script("crh_add"), *debug], _env(cli_env, broken), check=2, cwd=fresh)
        cmd([script("crh_cancel"), *debug, "1"], _env(cli_env, broken), check=2)
        cmd([script("crh_worker"), "-q", *debug], _env(cli_env, broken), check=2)
        cmd([script("crh"), "db", "status", *debug], _env(cli_env, broken), check=None)

    assert any("finished" in text for _, text in outputs)
    for what, text in outputs:
        assert password not in text, f"{what} printed the password:\n{text}"
    for path in tree.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), f"{path} holds the password"
    with psycopg.connect(db_url) as owner:
        for table in ("events", "inversions", "workers", "blobs", "blob_owners"):
            rows = owner.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))).fetchall()
            assert rows or table == "blob_owners"
            assert not any(password in row[0] for row in rows), f"{table} holds the password"
        activity = owner.execute("SELECT application_name FROM pg_stat_activity").fetchall()
        assert not any(password in (row[0] or "") for row in activity)
