"""The embedded cluster, started for real: as root, as a normal user, with either binaries."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import cr_queue
from cr_queue.db.embedded import binaries, server_user
from cr_queue.db.embedded import Cluster, EmbeddedError, default_cluster, find_bindir, server_version

FAST = {"fsync": "off", "full_page_writes": "off"}
TEST_USER = "crh-test"


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temp dir outside pytest's: every pytest session run as root resets
    pytest-of-root to 0700, which would lock a concurrent run's server user out
    of its own data directory.  In the session's directory (tests/hygiene.py),
    which the server user may pass."""
    path = Path(tempfile.mkdtemp(prefix="crh-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def scratch() -> Iterator[Path]:
    with scratch_dir() as path:
        yield path


@pytest.fixture()
def make_cluster(scratch: Path) -> Iterator:
    """Clusters in fresh dirs, each stopped after the test whatever happened."""
    clusters: list[Cluster] = []

    def make(name: str = "pg", **kwargs: object) -> Cluster:
        kwargs.setdefault("extra_conf", FAST)
        cluster = Cluster(scratch / str(len(clusters)) / name, **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop(mode="immediate")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with scratch_dir() as path:
        shared = Cluster(path / "pg", extra_conf=FAST)
        try:
            shared.start()
            yield shared
        finally:
            shared.stop()


def query(cluster: Cluster, statement: str) -> tuple:
    with psycopg.connect(cluster.url) as conn:
        row = conn.execute(statement).fetchone()
    assert row is not None
    return row


def wait_until_dead(pid: int) -> None:
    for _ in range(200):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not die")


def test_connect_and_select_1(cluster: Cluster) -> None:
    assert query(cluster, "SELECT 1, current_user, current_database()") == (1, "crh", "crh")


def test_only_a_private_unix_socket(cluster: Cluster) -> None:
    assert query(cluster, "SHOW listen_addresses") == ("",)
    assert query(cluster, "SHOW unix_socket_permissions") == ("0700",)
    assert query(cluster, "SHOW max_connections") == ("200",)
    assert query(cluster, "SHOW server_encoding") == ("UTF8",)
    assert cluster.url.startswith("postgresql://crh@/crh?host=")


def test_start_again_is_a_no_op(cluster: Cluster) -> None:
    pid = cluster.status()["pid"]
    cluster.start()
    assert cluster.status()["pid"] == pid
    assert query(cluster, "SELECT 1") == (1,)


def test_status_fields(cluster: Cluster) -> None:
    status = cluster.status()
    assert status["running"] is True
    assert isinstance(status["pid"], int)
    assert status["initialized"] is True
    assert status["datadir"] == str(cluster.datadir)
    assert status["socket_dir"] == str(cluster.datadir)
    assert status["bindir"] == str(cluster.bindir)
    assert status["version"] == server_version(cluster.bindir)
    assert status["url"] == cluster.url
    assert Path(str(status["logfile"])).is_file()
    json.dumps(status)
    server_version_num = query(cluster, "SHOW server_version")[0]
    assert server_version_num.split()[0] == status["version"]


def test_stop_then_start(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start()
    cluster.stop()
    assert not cluster.is_running()
    assert cluster.status()["pid"] is None
    cluster.stop()
    cluster.start()
    assert query(cluster, "SELECT 1") == (1,)


def test_restart_gives_a_new_server(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start()
    before = cluster.status()["pid"]
    cluster.restart()
    assert cluster.status()["pid"] != before
    assert query(cluster, "SELECT 1") == (1,)


def test_start_after_kill_9_with_stale_pid_file(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start()
    with psycopg.connect(cluster.url) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
        conn.commit()
        pid = cluster.status()["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        wait_until_dead(pid)
    assert (cluster.datadir / "postmaster.pid").exists()
    assert not cluster.is_running()
    cluster.start()
    assert cluster.status()["pid"] != pid
    assert query(cluster, "SELECT x FROM kept") == (42,)


def test_start_right_after_kill_9_while_server_is_dying(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start()
    for _ in range(3):
        held = [psycopg.connect(cluster.url) for _ in range(3)]
        pid = cluster.status()["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        cluster.start()
        assert cluster.status()["pid"] != pid
        assert query(cluster, "SELECT 1") == (1,)
        for conn in held:
            conn.close()


def test_pid_file_naming_a_foreign_live_process_is_stale(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start()
    cluster.stop()
    pid_file = cluster.datadir / "postmaster.pid"
    pid_file.write_text(f"{os.getpid()}\n{cluster.datadir}\n")
    assert not cluster.is_running()
    cluster.start()
    assert query(cluster, "SELECT 1") == (1,)


def test_default_settings_keep_fsync_on(make_cluster) -> None:
    cluster = make_cluster(extra_conf=None)
    cluster.start()
    assert query(cluster, "SHOW fsync") == ("on",)


def test_long_datadir_puts_socket_in_short_private_dir(make_cluster) -> None:
    cluster = make_cluster("d" * 60 + "/" + "e" * 60)
    cluster.start()
    socket_dir = cluster.socket_dir
    assert socket_dir != cluster.datadir
    assert str(socket_dir).startswith("/tmp/crh-")
    info = socket_dir.stat()
    assert info.st_mode & 0o777 == 0o700
    assert info.st_uid == cluster.datadir.stat().st_uid
    assert query(cluster, "SELECT 1") == (1,)


def test_concurrent_starts_do_not_race(scratch: Path) -> None:
    datadir = scratch / "pg"
    script = textwrap.dedent(
        f"""
        from cr_queue.db.embedded import Cluster
        Cluster({str(datadir)!r}, extra_conf={FAST!r}).start()
        """
    )
    starters = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    cluster = Cluster(datadir, extra_conf=FAST)
    try:
        assert [p.wait(timeout=120) for p in starters] == [0, 0, 0]
        assert query(cluster, "SELECT 1") == (1,)
    finally:
        cluster.stop()


def test_failed_start_names_log_and_remedy(make_cluster) -> None:
    cluster = make_cluster(extra_conf={"max_connections": "lots"})
    with pytest.raises(EmbeddedError) as err:
        cluster.start(timeout=20)
    message = str(err.value)
    assert "did not start" in message
    assert str(cluster.logfile) in message
    assert "max_connections" in message
    assert "Remedy" in message


def test_not_empty_non_cluster_dir_is_refused(tmp_path: Path) -> None:
    datadir = tmp_path / "pg"
    datadir.mkdir()
    (datadir / "something").write_text("x")
    with pytest.raises(EmbeddedError, match="not empty"):
        Cluster(datadir).start()


def test_default_cluster_location(tmp_path: Path) -> None:
    assert default_cluster({"CRH_EMBEDDED_DIR": str(tmp_path / "x")}).datadir == tmp_path / "x"
    assert default_cluster({}).datadir.name == "postgresql"


def test_find_bindir_explicit(tmp_path: Path) -> None:
    bindir = find_bindir()
    assert find_bindir({"CRH_PG_BINDIR": str(bindir)}) == bindir
    with pytest.raises(EmbeddedError, match="CRH_PG_BINDIR"):
        find_bindir({"CRH_PG_BINDIR": str(tmp_path)})


def test_find_bindir_without_any_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(binaries, "_candidate_bindirs", lambda env: iter([tmp_path]))
    with pytest.raises(EmbeddedError) as err:
        find_bindir({})
    assert "pip install pgserver" in str(err.value)
    assert "CRH_DATABASE_URL" in str(err.value)


def test_find_bindir_matches_the_cluster_major_version() -> None:
    bindir = find_bindir({"PATH": os.environ.get("PATH", "")})
    major = binaries.major_version(server_version(bindir))
    assert find_bindir({"PATH": os.environ.get("PATH", "")}, major=major) == bindir
    with pytest.raises(EmbeddedError, match="needs PostgreSQL 7.4"):
        find_bindir({"PATH": os.environ.get("PATH", "")}, major="7.4")


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path needs root")
def test_root_runs_the_server_as_an_unprivileged_user(cluster: Cluster) -> None:
    status = cluster.status()
    assert status["server_user"] != "root"
    owner = cluster.datadir.stat()
    assert owner.st_uid != 0
    assert owner.st_mode & 0o777 == 0o700
    uid_line = next(
        line for line in Path(f"/proc/{status['pid']}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert set(uid_line.split()[1:]) == {str(owner.st_uid)}
    assert pwd.getpwuid(owner.st_uid).pw_name == status["server_user"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path needs root")
def test_root_honours_crh_embedded_user(unprivileged_user, make_cluster) -> None:
    user = unprivileged_user
    cluster = make_cluster(env={**os.environ, "CRH_EMBEDDED_USER": user.pw_name})
    cluster.start()
    assert cluster.status()["server_user"] == user.pw_name
    assert cluster.datadir.stat().st_uid == user.pw_uid
    assert query(cluster, "SELECT 1") == (1,)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path needs root")
def test_root_without_postgres_user_uses_crh_embedded(
    remove_new_users, make_cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_getpwnam = pwd.getpwnam

    def no_postgres(name: str) -> pwd.struct_passwd:
        if name == "postgres":
            raise KeyError(name)
        return real_getpwnam(name)

    monkeypatch.setattr(server_user.pwd, "getpwnam", no_postgres)
    cluster = make_cluster()
    cluster.start()
    assert cluster.status()["server_user"] == server_user.FALLBACK_USER
    assert query(cluster, "SELECT 1") == (1,)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path needs root")
def test_root_rejects_unknown_crh_embedded_user(make_cluster) -> None:
    cluster = make_cluster(env={**os.environ, "CRH_EMBEDDED_USER": "no-such-user-crh"})
    with pytest.raises(EmbeddedError, match="CRH_EMBEDDED_USER=no-such-user-crh"):
        cluster.start()


def _pgserver_bindir() -> Path:
    bindir = binaries.pgserver_bindir()
    if bindir is None or not binaries.has_server_binaries(bindir):
        pytest.skip("the pgserver wheel is not installed")
    return bindir


def test_pgserver_wheel_binaries(scratch: Path) -> None:
    bindir = _pgserver_bindir()
    env = {**os.environ, "CRH_PG_BINDIR": str(bindir)}
    cluster = Cluster(scratch / "pg", extra_conf=FAST, env=env)
    try:
        cluster.start()
        assert cluster.status()["bindir"] == str(bindir)
        version = query(cluster, "SHOW server_version")[0]
        assert version.split()[0] == server_version(bindir)
        assert (cluster.datadir / "PG_VERSION").read_text().strip() == binaries.major_version(version)
        assert "pgserver" not in sys.modules
    finally:
        cluster.stop()


NON_ROOT_SCRIPT = """
import json, os
import psycopg
from cr_queue.db.embedded import default_cluster

cluster = default_cluster()
cluster.start()
try:
    with psycopg.connect(cluster.url) as conn:
        row = conn.execute("SELECT 1, current_user").fetchone()
    cluster.start()
    status = cluster.status()
finally:
    cluster.stop()
print(json.dumps({"euid": os.geteuid(), "row": list(row), "status": status,
                  "running_after_stop": cluster.is_running()}))
"""


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="not root, so no other user to switch to; every other test already runs as this user",
)
def test_normal_user_runs_everything_as_itself(unprivileged_user, traverse) -> None:
    user = unprivileged_user
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    # The interpreter may sit under /root (0700): passable for this test only.
    traverse(user, Path(sys.executable).resolve(), Path(cr_queue.__file__), Path(psycopg.__file__))
    home = Path(tempfile.mkdtemp(prefix="crh-user-"))
    os.chown(home, user.pw_uid, user.pw_gid)
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "CRH_EMBEDDED_DIR": str(home / "pg"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        result = subprocess.run(
            [sys.executable, "-c", NON_ROOT_SCRIPT],
            user=user.pw_uid, group=user.pw_gid, extra_groups=groups,
            env=env, cwd=str(home), capture_output=True, text=True, timeout=180,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["euid"] == user.pw_uid
        assert report["row"] == [1, "crh"]
        assert report["status"]["running"] is True
        assert report["status"]["server_user"] == user.pw_name
        assert report["running_after_stop"] is False
        assert (home / "pg").stat().st_uid == user.pw_uid
    finally:
        Cluster(home / "pg").stop(mode="immediate")
        shutil.rmtree(home, ignore_errors=True)
