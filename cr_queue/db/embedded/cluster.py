"""The embedded cluster's life: created (initdb), started, checked, stopped, one starter at a time.

The server binaries come from binaries.py; when root asks, the server runs
as the OS user that server_user.py chooses, and every file and directory the
server needs is handed to that user through it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import platformdirs
import psycopg

from cr_queue.db.embedded import server_user
from cr_queue.db.embedded.binaries import find_bindir, major_version, server_version
from cr_queue.db.embedded.errors import EmbeddedError
from cr_queue.db.embedded.server_user import ServerUser

log = logging.getLogger(__name__)

PORT = 5432
MANAGED_CONF = "crh_embedded.conf"
# sun_path holds 108 bytes on Linux and 104 on macOS; stay clear of both.
SOCKET_PATH_MAX = 100
_LOG_TAIL_LINES = 20


def default_cluster(env: Mapping[str, str] | None = None) -> Cluster:
    """The user's own cluster, under the platformdirs data dir unless overridden."""
    env = os.environ if env is None else env
    datadir = env.get("CRH_EMBEDDED_DIR")
    path = Path(datadir) if datadir else platformdirs.user_data_path("cr_queue") / "postgresql"
    return Cluster(path, env=env)


class Cluster:
    """One private PostgreSQL cluster in ``datadir``, reached over a Unix socket."""

    def __init__(
        self,
        datadir: Path,
        *,
        bindir: Path | None = None,
        dbname: str = "crh",
        superuser: str = "crh",
        extra_conf: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.datadir = Path(datadir).expanduser().absolute()
        self.dbname = dbname
        self.superuser = superuser
        self.extra_conf = dict(extra_conf or {})
        self._env = dict(os.environ if env is None else env)
        self._bindir = Path(bindir) if bindir is not None else None

    def __repr__(self) -> str:
        return f"Cluster({str(self.datadir)!r})"

    @property
    def bindir(self) -> Path:
        """Resolved lazily, matching the cluster's version once it exists."""
        if self._bindir is None:
            major = self._data_version() if self.initialized else None
            self._bindir = find_bindir(self._env, major=major)
        return self._bindir

    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file() and (
            self.datadir / "global" / "pg_control"
        ).is_file()

    @property
    def logfile(self) -> Path:
        """pg_ctl's log: start-up messages before the server's own log files take over."""
        return self.datadir / "log" / "startup.log"

    @property
    def socket_dir(self) -> Path:
        """The datadir when the socket path fits in sun_path, else a short /tmp dir."""
        if len(os.fsencode(self.datadir / f".s.PGSQL.{PORT}")) < SOCKET_PATH_MAX:
            return self.datadir
        digest = hashlib.sha256(os.fsencode(self.datadir)).hexdigest()[:12]
        return Path("/tmp") / f"crh-{os.geteuid()}-{digest}"

    @property
    def url(self) -> str:
        return self._url(self.dbname)

    def _url(self, dbname: str) -> str:
        # The port is explicit so a PGPORT in the client's environment cannot
        # send libpq to another socket name in the same directory.
        host = quote(str(self.socket_dir), safe="/")
        return (
            f"postgresql://{quote(self.superuser, safe='')}@/{quote(dbname, safe='')}"
            f"?host={host}&port={PORT}"
        )

    def init(self) -> None:
        """Create the cluster (initdb) unless it exists."""
        with self._locked():
            self._init_unlocked()

    def start(self, timeout: float = 60) -> None:
        """Make sure the server runs and the database exists; cheap when it already runs."""
        with self._locked(timeout):
            self._init_unlocked()
            self._run_and_ensure_database(timeout)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server if it runs; a stale pid file is simply removed."""
        if not self.datadir.exists():
            return
        with self._locked(timeout):
            self._stop_unlocked(mode, timeout)

    def restart(self, timeout: float = 60) -> None:
        with self._locked(timeout):
            self._stop_unlocked("fast", timeout)
            self._init_unlocked()
            self._run_and_ensure_database(timeout)

    def is_running(self) -> bool:
        pid = self._pid()
        return pid is not None and self._is_our_postmaster(pid)

    def status(self) -> dict[str, object]:
        """Plain values only, so `crh db status --json` can print it as is."""
        running = self.is_running()
        try:
            bindir: Path | None = self.bindir
        except EmbeddedError:
            bindir = None
        return {
            "running": running,
            "pid": self._pid() if running else None,
            "initialized": self.initialized,
            "datadir": str(self.datadir),
            "socket_dir": str(self.socket_dir),
            "bindir": str(bindir) if bindir else None,
            "version": server_version(bindir) if bindir else None,
            "url": self.url,
            "logfile": str(self.logfile),
            "server_user": server_user.name_of(self.datadir, self.initialized),
        }

    # -- setting up ---------------------------------------------------------

    def _init_unlocked(self) -> None:
        if self.initialized:
            return
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise EmbeddedError(
                f"{self.datadir} is not empty but holds no PostgreSQL cluster (an interrupted "
                "initdb?); remove it, or set CRH_EMBEDDED_DIR to another directory"
            )
        user = self._server_user()
        server_user.make_private_dir(self.datadir, user)
        result = self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", self.superuser,
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
                *self._no_instructions(),
            ],
            timeout=300,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            shutil.rmtree(self.datadir, ignore_errors=True)
            raise EmbeddedError(
                f"initdb failed for {self.datadir} (exit {result.returncode}):\n{output}\n"
                "Check that the directory is writable and the disk has space, or configure "
                "a database server with --db or CRH_DATABASE_URL"
            )
        server_user.make_private_dir(self.datadir / "log", user)
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "\n# cr_queue: the settings of the embedded cluster live in the file below,\n"
                "# which cr_queue rewrites at every start.\n"
                f"include_if_exists = '{MANAGED_CONF}'\n"
            )

    def _no_instructions(self) -> list[str]:
        """initdb learnt --no-instructions in PostgreSQL 14; Debian 11 still ships 13."""
        first = major_version(server_version(self.bindir)).split(".")[0]
        return ["--no-instructions"] if first.isdigit() and int(first) >= 14 else []

    def _write_managed_conf(self, user: ServerUser | None) -> None:
        """Rewritten at every start so a moved datadir or new defaults take effect."""
        settings = {
            "listen_addresses": "",
            "port": str(PORT),
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "max_connections": "200",
            "logging_collector": "on",
            "log_directory": "log",
            "log_filename": "postgresql-%a.log",
            "log_truncate_on_rotation": "on",
            "log_rotation_age": "1d",
            "log_rotation_size": "0",
            **self.extra_conf,
        }
        lines = [f"{key} = '{_quote_conf(value)}'" for key, value in settings.items()]
        path = self.datadir / MANAGED_CONF
        path.write_text("# written by cr_queue at every start; edits are lost\n"
                        + "\n".join(lines) + "\n", encoding="utf-8")
        server_user.own(path, user, 0o600)

    def _prepare_socket_dir(self, user: ServerUser | None) -> None:
        socket_dir = self.socket_dir
        if socket_dir == self.datadir:
            return
        owner = user.uid if user is not None else os.geteuid()
        try:
            socket_dir.mkdir(mode=0o700)
            server_user.own(socket_dir, user, 0o700)
        except FileExistsError:
            pass
        info = socket_dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner:
            raise EmbeddedError(
                f"socket directory {socket_dir} exists but is not a directory owned by uid "
                f"{owner}; remove it (someone else may have created it) and start again"
            )
        server_user.own(socket_dir, user, 0o700)

    def _run_and_ensure_database(self, timeout: float) -> None:
        """Start if needed, then create the database, retrying while the server settles.

        A server that was just killed still looks alive for a moment, and one in
        crash recovery refuses connections; both resolve themselves in seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                self._start_unlocked(max(1.0, deadline - time.monotonic()))
            try:
                self._ensure_database()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise self._error(f"cannot connect to the embedded server ({exc})") from exc
                time.sleep(0.2)
            except psycopg.Error as exc:
                raise self._error(f"cannot create database {self.dbname!r} ({exc})") from exc

    def _ensure_database(self) -> None:
        """Connect to the cluster's database; create it with createdb when it is missing.

        Like initdb and pg_ctl, createdb is one of the server's own programs:
        this module drives the cluster with them and sends no SQL itself (every
        statement cr_queue sends lives in cr_queue/queries/).
        """
        try:
            psycopg.connect(self.url, connect_timeout=5).close()
            return
        except psycopg.OperationalError as exc:
            # The cluster is initialised with --locale=C, so the server says this in English.
            if f'database "{self.dbname}" does not exist' not in str(exc):
                raise  # not up yet: the caller retries
        result = self._run(
            [str(self.bindir / "createdb"), f"--maintenance-db={self._url('postgres')}", "--", self.dbname],
            timeout=60,
        )
        try:
            psycopg.connect(self.url, connect_timeout=5).close()  # also when another process created it first
        except psycopg.OperationalError as exc:
            detail = (result.stdout + result.stderr).strip() or str(exc).strip()
            raise self._error(f"cannot create database {self.dbname!r} ({detail})") from exc

    # -- running ------------------------------------------------------------

    def _start_unlocked(self, timeout: float) -> None:
        user = self._server_user()
        self._remove_stale_pid()
        self._prepare_socket_dir(user)
        self._write_managed_conf(user)
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(1, int(deadline - time.monotonic()))
            log_offset = _size(self.logfile)
            result = self._pg_ctl("start", "-w", "-t", str(remaining), "-l", str(self.logfile))
            if result.returncode == 0:
                return
            if self.is_running():
                raise self._error(
                    f"the embedded PostgreSQL server is still starting after {timeout:.0f} s "
                    "(crash recovery?); wait, then run the command again"
                )
            # After a kill -9 the old server's children may hold the shared
            # memory for a moment; they exit once they notice, so try again.
            if "still in use" in _read_from(self.logfile, log_offset) and time.monotonic() < deadline:
                self._remove_stale_pid()
                time.sleep(0.5)
                continue
            output = (result.stdout + result.stderr).strip()
            raise self._error(f"the embedded PostgreSQL server did not start: {output}")

    def _stop_unlocked(self, mode: str, timeout: float) -> None:
        if self.is_running():
            result = self._pg_ctl("stop", "-m", mode, "-w", "-t", str(max(1, int(timeout))))
            if result.returncode != 0 and self.is_running():
                output = (result.stdout + result.stderr).strip()
                raise self._error(f"the embedded PostgreSQL server did not stop: {output}")
        self._remove_stale_pid()
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        """Leave no empty /tmp directory behind; it is made again at the next start."""
        if self.socket_dir != self.datadir:
            try:
                self.socket_dir.rmdir()
            except OSError:
                pass

    def _remove_stale_pid(self) -> None:
        """A dead server's lock files must not block the next start.

        PostgreSQL trusts a pid that still exists, but after a kill -9 that pid
        can be a zombie or a reused number; the socket directory is private to
        this cluster, so its lock file is stale whenever our server is not running.
        """
        if self.is_running():
            return
        for lock in (self.datadir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{PORT}.lock"):
            if lock.exists():
                log.info("removing stale %s", lock)
                lock.unlink(missing_ok=True)

    def _pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            # Our server runs as us (or root asks); another owner means a reused pid.
            return False
        proc = Path("/proc") / str(pid)
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                return False
        except (OSError, IndexError):
            return True
        try:
            return Path(os.readlink(proc / "cwd")) == self.datadir.resolve()
        except OSError:
            return True

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bindir / "pg_ctl"), *args, "-D", str(self.datadir)], timeout=None)

    # -- the server's OS user (server_user.py) -------------------------------

    def _server_user(self) -> ServerUser | None:
        return server_user.choose(self.datadir, self.initialized, self._env)

    def _run(self, args: Sequence[str], *, timeout: float | None) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the server user when we are root."""
        user = self._server_user()
        env = {k: v for k, v in self._env.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs = server_user.run_as(user, self.datadir, args[0], env) if user is not None else {}
        try:
            return subprocess.run(
                list(args), capture_output=True, text=True, env=env, cwd="/",
                stdin=subprocess.DEVNULL, timeout=timeout, **kwargs,  # type: ignore[arg-type]
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise self._error(f"cannot run {args[0]} ({exc})") from exc

    # -- locking, logs and errors ------------------------------------------

    @contextmanager
    def _locked(self, timeout: float = 60) -> Iterator[None]:
        """One starter at a time: two commands starting the cluster must not race."""
        lock_path = self.datadir.parent / f".{self.datadir.name}.lock"
        try:
            self.datadir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise EmbeddedError(
                f"cannot create the embedded database's directory {self.datadir.parent}: "
                f"{exc.strerror}. Make sure your home directory exists and is writable, "
                "set CRH_EMBEDDED_DIR to a directory of yours, or configure a database URL "
                "(--db or CRH_DATABASE_URL)."
            ) from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EmbeddedError(
                            f"another process holds {lock_path} (starting or stopping the "
                            f"embedded database) for more than {timeout:.0f} s; wait for it "
                            "or end it, then try again"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _data_version(self) -> str:
        return (self.datadir / "PG_VERSION").read_text().strip()

    def _log_files(self) -> list[Path]:
        logs = sorted((self.datadir / "log").glob("postgresql-*.log"), key=_mtime)
        return [self.logfile, *logs[-1:]]

    def _log_tail(self) -> str:
        parts: list[str] = []
        for path in sorted(self._log_files(), key=_mtime):
            try:
                lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
            except OSError:
                continue
            if lines:
                parts.append(f"==> {path} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    def _error(self, what: str) -> EmbeddedError:
        tail = self._log_tail() or f"(nothing in {self.logfile})"
        return EmbeddedError(
            f"{what}\nlast lines of the server log:\n{tail}\n"
            f"Remedy: fix the cause shown in the log; `crh db stop` then retry, or remove "
            f"{self.datadir} to start from an empty database, or configure a database server "
            "with --db or CRH_DATABASE_URL"
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _quote_conf(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "''")
