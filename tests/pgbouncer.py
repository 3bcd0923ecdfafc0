"""A real PgBouncer in transaction pooling mode in front of the test cluster (fixture ``pgbouncer``).

Debian's ``/usr/sbin/pgbouncer`` runs as a child process of the test session:
``pool_mode = transaction``, listening on 127.0.0.1 on a free port, reaching
the session's cluster over its Unix socket, every database by its own name
(``* =``), ``auth_type = trust`` (a test cluster trusts its socket too).
PgBouncer refuses to run as root, and the cluster's socket directory is
private (0700) to the OS user the server runs as, so PgBouncer runs as that
same user (the owner of the data directory; as a normal user, the caller);
no account is created for it.  Its configuration, log and pid file live in a
temporary directory removed at the end, and the process is stopped there.

The version installed is the one tested; the fixture prints it and writes it
at the top of its log.  Where the binary is missing the tests that need it are
skipped, saying which package brings it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import conninfo

from cr_queue.db.embedded import PORT, Cluster
from cr_queue.db.embedded import server_user

BINARY = Path("/usr/sbin/pgbouncer")
START_S = 30.0


class PgBouncerMissing(Exception):
    """No pgbouncer binary on this machine (the tests that need it are skipped)."""


def version() -> str:
    """The first line of ``pgbouncer --version`` (e.g. "PgBouncer 1.18.0")."""
    out = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgBouncer:
    """One running pgbouncer; :meth:`url` is a test database's URL through it."""

    cluster: Cluster
    home: Path
    port: int
    version: str
    proc: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.home / "pgbouncer.log"

    def url(self, db_url: str) -> str:
        """``db_url`` (a database of the cluster) reached through this pgbouncer instead."""
        dbname = conninfo.conninfo_to_dict(db_url)["dbname"]
        return f"postgresql://{self.cluster.superuser}@127.0.0.1:{self.port}/{dbname}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "safe shutdown": close client and server connections, exit
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(cluster: Cluster, *, pool_size: int = 4) -> PgBouncer:
    """Start pgbouncer in front of ``cluster``; the caller stops it (:meth:`PgBouncer.stop`) and removes ``home``."""
    if not BINARY.exists():
        raise PgBouncerMissing(f"{BINARY} is not installed (Debian package pgbouncer: apt-get install pgbouncer)")
    found = version()
    home = Path(tempfile.mkdtemp(prefix="crh-test-pgbouncer-"))
    try:
        owner = cluster.datadir.stat().st_uid
        user = server_user.ServerUser.from_pwd(pwd.getpwuid(owner)) if os.geteuid() == 0 else None
        port = _free_port()
        superuser = cluster.superuser
        (home / "userlist.txt").write_text(f'"{superuser}" ""\n')
        (home / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={cluster.socket_dir} port={PORT}",
                    "",
                    "[pgbouncer]",
                    "pool_mode = transaction",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {home / 'userlist.txt'}",
                    f"logfile = {home / 'pgbouncer.log'}",
                    f"pidfile = {home / 'pgbouncer.pid'}",
                    f"admin_users = {superuser}",
                    "max_client_conn = 500",
                    f"default_pool_size = {pool_size}",
                    "max_db_connections = 0",
                    # Server connections come and go with the test databases (DROP ... WITH (FORCE)).
                    "server_login_retry = 1",
                    "",
                ]
            )
        )
        (home / "pgbouncer.log").write_text(f"# {found} ({BINARY}), started by the cr_queue test suite\n")
        kwargs: dict[str, object] = {}
        env = dict(os.environ)
        if user is not None:
            server_user.grant_traverse(home, user)  # the cluster's own start already granted the same ancestors
            for path in home.iterdir():
                os.chown(path, user.uid, user.gid)
            os.chown(home, user.uid, user.gid)
            env["HOME"] = str(home)
            env["USER"] = env["LOGNAME"] = user.name
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        proc = subprocess.Popen(
            [str(BINARY), str(home / "pgbouncer.ini")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=home,
            **kwargs,
        )
        bouncer = PgBouncer(cluster, home, port, found, proc)
        _wait_ready(bouncer)
        return bouncer
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise


def _wait_ready(bouncer: PgBouncer) -> None:
    url = bouncer.url(bouncer.cluster.url)
    deadline = time.monotonic() + START_S
    while True:
        if bouncer.proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited ({bouncer.proc.returncode}) at start:\n{bouncer.log_text()}")
        try:
            with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                bouncer.stop()
                raise RuntimeError(f"pgbouncer did not accept connections within {START_S} s ({exc}):\n{bouncer.log_text()}")
            time.sleep(0.1)
