"""docs/security.md, tried as a new admin would: every marked block of its set-up runs here.

A dedicated cluster gets the page's postgresql.conf settings (with TLS on
localhost), its pg_hba.conf lines (after the few this test needs: the test's
superuser stands in for ``sudo -u postgres``, and the peer lines of the page
cannot match the account running the tests), its SQL, its commands, config
files, ``.pgpass`` and service file, with only the host name, port and file
paths replaced.  Then scientists and a node use it through the real commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cr_queue.tomodir import synth
from cr_queue.db.embedded import PORT, Cluster

from .conftest import script

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
BLOCK = re.compile(r"<!-- test: ([\w-]+) -->\n```[\w]*\n(.*?)```", re.S)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")


def doc_blocks() -> dict[str, str]:
    return dict(BLOCK.findall(DOC.read_text()))


class SiteCluster(Cluster):
    """The embedded cluster class on a port of its own (TCP on localhost, for TLS)."""

    def __init__(self, *args, port: int, **kwargs) -> None:
        self.port = port
        super().__init__(*args, **kwargs)

    def _url(self, dbname: str) -> str:
        return super()._url(dbname).replace(f"port={PORT}", f"port={self.port}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(where: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate for node01."""
    where.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=crqueue test CA", cwd=where)
    (where / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for name, cn, ext in (("server", "localhost", ["-extfile", "san.ext"]), ("node01", "node01", [])):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=where)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", *ext, cwd=where,
        )
    for path in where.glob("*.key"):
        path.chmod(0o600)
    return {p.stem + p.suffix.replace(".", "_"): p for p in where.iterdir()}


@pytest.fixture(scope="module")
def site():
    # Not under pytest's basetemp, which a concurrent session may prune (see conftest.pg_cluster).
    home = Path(tempfile.mkdtemp(prefix="crh-test-site-"))
    cluster = None
    try:
        certs = _certificates(home / "certs")
        port = _free_port()
        blocks = doc_blocks()
        cluster = SiteCluster(home / "data", port=port, extra_conf={"fsync": "off", "synchronous_commit": "off"})
        cluster.init()
        owner = cluster.datadir.stat()
        server_files = cluster.datadir / "site"
        server_files.mkdir()
        for name in ("server.crt", "server.key", "ca.crt"):
            shutil.copy(certs[name.replace(".", "_")], server_files / name)
        hba = server_files / "pg_hba.conf"
        hba.write_text(
            "# this test's own lines first: its superuser, and password/cert instead of peer\n"
            "local    all   crh           trust\n"
            "local    all   all           scram-sha-256\n"
            "hostssl  all   +crh_worker   127.0.0.1/32  cert\n"
            "hostssl  all   all           127.0.0.1/32  scram-sha-256\n"
            "# docs/security.md, verbatim (the server refuses to start if a line is wrong)\n"
            + blocks["pg_hba"]
        )
        for path in (server_files, *server_files.iterdir()):
            os.chown(path, owner.st_uid, owner.st_gid)
            path.chmod(0o700 if path.is_dir() else 0o600)
        settings = {}
        for line in blocks["server-conf"].splitlines():
            key, _, value = (part.strip() for part in line.partition("="))
            settings[key] = value.strip("'")
        settings["listen_addresses"] = "127.0.0.1"
        for key in ("ssl_cert_file", "ssl_key_file", "ssl_ca_file"):
            settings[key] = str(server_files / Path(settings[key]).name)
        cluster.extra_conf.update(settings, hba_file=str(hba), port=str(port))
        cluster.start()
        yield {"cluster": cluster, "port": port, "certs": certs, "home": home, "blocks": blocks}
    finally:
        if cluster is not None:
            cluster.stop(mode="immediate")
        shutil.rmtree(home, ignore_errors=True)


def here(site, text: str) -> str:
    """The page's host names and paths, made to point at this test's cluster and files."""
    certs, port = site["certs"], site["port"]
    text = text.replace("dbhost.example.org:5432:", f"localhost:{port}:")
    text = text.replace("host=dbhost.example.org", f"host=localhost\nport={port}")
    text = text.replace("dbhost.example.org", f"localhost:{port}")
    text = text.replace("/etc/ssl/certs/crqueue-ca.crt", str(certs["ca_crt"]))
    text = text.replace("/etc/cr_queue/node01.crt", str(certs["node01_crt"]))
    text = text.replace("/etc/cr_queue/node01.key", str(certs["node01_key"]))
    return text


def _env(site, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRH_", "PG"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        CRH_SYSTEM_CONFIG=str(home / "no-system-config.toml"),
        CRH_EMBEDDED_DIR=str(home / "no-embedded"),
        CRH_CRMOD=script("crh_standin_crmod"),
        CRH_CRTOMO=script("crh_standin_crtomo"),
        NO_COLOR="1",
    )
    env.update(extra)
    return env


def _private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _console(site, block: str, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Run the ``$ ...`` lines of a console block (``export`` sets the environment)."""
    done = []
    for line in block.splitlines():
        if not line.startswith("$ "):
            continue
        argv = shlex.split(here(site, line[2:]), comments=True)
        if argv[0] == "export":
            key, _, value = argv[1].partition("=")
            env[key] = value
            continue
        program = script(argv[0]) if argv[0].startswith("crh") else argv[0]
        done.append(subprocess.run([program, *argv[1:]], env=env, capture_output=True, text=True, timeout=300))
    return done


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_documented_installation(site, tmp_path):
    blocks = site["blocks"]
    superuser = site["cluster"]._url("postgres")
    # 2. the owner and the database, as the superuser
    sql_file = tmp_path / "create-owner.sql"
    sql_file.write_text(blocks["create-owner"])
    _ok(subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", superuser, "-f", str(sql_file)],
                       capture_output=True, text=True, timeout=60))
    passwords = {"crqueue": "owner-secret", "bob": "bob-secret"}
    # the page's .pgpass line gives alice's password
    host, port, dbname, user, password = here(site, blocks["pgpass"]).strip().split(":")
    assert (host, int(port), dbname, user) == ("localhost", site["port"], "crqueue", "alice")
    passwords[user] = password
    # an owner without CREATEROLE cannot make the roles: a clear refusal, nothing half-made
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute("CREATE ROLE plainowner LOGIN")
        conn.execute("CREATE DATABASE plain OWNER plainowner")
        _set_password(conn, "plainowner", "plain-secret")
    plain = site["cluster"]._url("plain").replace("crh@", "plainowner@")
    _private(tmp_path / "plain" / ".pgpass", "*:*:plain:plainowner:plain-secret\n")
    proc = _run("crh", "db", "upgrade", "--db", plain, env=_env(site, tmp_path / "plain"))
    assert proc.returncode == 2 and "may not create roles" in proc.stderr and "CREATEROLE" in proc.stderr
    with psycopg.connect(site["cluster"]._url("plain")) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
    # 3. the schema, as the owner (its password in the admin's ~/.pgpass)
    admin_home = tmp_path / "admin"
    _private(admin_home / ".pgpass", f"localhost:{site['port']}:crqueue:crqueue:{passwords['crqueue']}\n")
    with psycopg.connect(superuser, autocommit=True) as conn:
        _set_password(conn, "crqueue", passwords["crqueue"])
    admin = _env(site, admin_home)
    (upgrade,) = _console(site, blocks["schema"], admin)
    assert "-> " in _ok(upgrade).stdout
    # 4. logins
    grants = _console(site, blocks["grant"], admin)
    assert [p.returncode for p in grants] == [0, 0, 0], [p.stderr for p in grants]
    assert "created login role node01" in grants[2].stdout
    with psycopg.connect(superuser, autocommit=True) as conn:
        for name in ("alice", "bob"):
            _set_password(conn, name, passwords[name])
        assert conn.execute(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = 'crqueue'"
        ).fetchone() == (False,)

    # 5. alice: config without password, password in ~/.pgpass
    alice_home = tmp_path / "alice"
    user_config = here(site, blocks["user-config"])
    assert "alice" in user_config and "password" not in user_config
    config = alice_home / ".config" / "cr_queue" / "config.toml"
    _private(config, user_config, 0o644)  # holds no password: may be readable
    pgpass = _private(alice_home / ".pgpass", here(site, blocks["pgpass"]))
    alice = _env(site, alice_home)
    tree = alice_home / "survey"
    synth.make_tree(tree, n_inv=2, n_mod=1)
    added = json.loads(_ok(_run("crh_add", "--json", env=alice, cwd=tree)).stdout)["added"]
    ids = [str(a["job_id"]) for a in added]
    assert len(ids) == 3

    # libpq ignores a .pgpass others can read: a clear error, no traceback, no password
    pgpass.chmod(0o644)
    proc = _run("crh_add", env=alice, cwd=_fresh_tree(tmp_path / "t2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "~/.pgpass" in proc.stderr and "chmod 600" in proc.stderr
    assert passwords["alice"] not in proc.stderr
    pgpass.chmod(0o600)

    # TLS is verified: the certificate names localhost, not 127.0.0.1; and plain TCP is refused
    for wrong in ("sslmode=verify-full", "sslmode=disable"):
        url = re.search(r'url = "(.*)"', user_config).group(1)
        url = url.replace("localhost", "127.0.0.1") if wrong.endswith("full") else url.replace("sslmode=verify-full", wrong)
        proc = _run("crh_cancel", ids[0], env={**alice, "CRH_DATABASE_URL": url})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert ("does not match host name" in proc.stderr) if wrong.endswith("full") else ("no encryption" in proc.stderr)

    # bob sees none of it and cannot cancel it
    bob_home = tmp_path / "bob"
    _private(bob_home / ".config" / "cr_queue" / "config.toml", user_config.replace("alice@", "bob@"))
    _private(bob_home / ".pgpass", f"localhost:{site['port']}:crqueue:bob:{passwords['bob']}\n")
    bob = _env(site, bob_home)
    proc = _run("crh_cancel", *ids, env=bob)
    assert proc.returncode == 1 and proc.stderr.count("not in the database") == 3

    # 6. the node: certificate, no password
    node_home = tmp_path / "node01"
    node_config = _private(node_home / "config.toml", here(site, blocks["node-config"]), 0o644)
    node = _env(site, node_home, CRH_CONFIG=str(node_config))
    report = json.loads(_ok(_run("crh_worker", "-q", "--json", env=node)).stdout)
    assert report["finished"] == 3
    # without its certificate the node gets nowhere
    no_cert = re.sub(r"&sslcert=[^&\"]*&sslkey=[^&\"]*", "", node_config.read_text())
    _private(node_home / "no-cert.toml", no_cert, 0o644)
    proc = _run("crh_worker", "-q", env={**node, "CRH_CONFIG": str(node_home / "no-cert.toml")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr

    # 5b. alice through the service file, password still from ~/.pgpass
    _private(alice_home / ".pg_service.conf", here(site, blocks["service"]), 0o644)
    config.write_text('[database]\nurl = "service=crqueue"\n')
    proc = _ok(_run("crh_retrieve", "--json", env=alice, cwd=tree))
    assert len(json.loads(proc.stdout)["retrieved"]) == 3

    # 7. the checks of the page, as alice through her service
    checks = _console(site, blocks["check"], dict(alice))
    counts = [p.stdout for p in checks]
    assert re.search(r"^\s*3\s*$", counts[0], re.M), checks[0]
    assert re.search(r"^\s*3\s*$", counts[1], re.M), checks[1]
    assert checks[2].returncode != 0 and "permission denied" in checks[2].stderr
    # bob's psql sees nothing; the node's DELETE is refused
    bob_url = re.search(r'url = "(.*)"', user_config).group(1).replace("alice@", "bob@")
    proc = subprocess.run(["psql", "-X", "-At", "-d", bob_url, "-c", "SELECT count(*) FROM inversions"],
                          env=bob, capture_output=True, text=True, timeout=60)
    assert _ok(proc).stdout.strip() == "0"
    node_url = re.search(r'url = "(.*)"', node_config.read_text()).group(1)
    proc = subprocess.run(["psql", "-X", "-d", node_url, "-c", "DELETE FROM inversions"],
                          env=node, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "permission denied" in proc.stderr

    # .pgpass and the service file where PGPASSFILE and PGSERVICEFILE say, as libpq defines them
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (alice_home / ".pgpass").rename(elsewhere / "pgpass")
    (alice_home / ".pg_service.conf").rename(elsewhere / "services")
    proc = _run("crh", "status", "--json", env=alice)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    named = {**alice, "PGPASSFILE": str(elsewhere / "pgpass"), "PGSERVICEFILE": str(elsewhere / "services")}
    proc = _ok(_run("crh", "status", "--json", env=named))
    assert passwords["alice"] not in proc.stdout + proc.stderr


def _set_password(conn: psycopg.Connection, name: str, password: str) -> None:
    # psql's \password would hash it client-side; a test may send it as a literal
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))


def _run(name: str, *args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([script(name), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _fresh_tree(root: Path) -> Path:
    synth.make_tree(root, n_inv=1, seed=3)
    return root


def test_the_page_marks_every_block_the_test_runs():
    assert set(doc_blocks()) == {
        "server-conf", "pg_hba", "create-owner", "schema", "grant", "user-config", "pgpass", "service",
        "node-config", "check",
    }
