"""The zero-setup database: a private PostgreSQL cluster started on demand.

A one-machine user has no database server, so cr_queue keeps its own cluster
under the user's data directory, reachable only through a Unix socket in a
0700 directory (no TCP, so trust authentication is safe), and starts it when a
command needs it.  The test suite starts its throwaway clusters with the same
class, which is why start-up must be fast and must survive a killed server.

PostgreSQL refuses to run as root, so when root asks for a cluster the server
runs as an unprivileged OS user (see :meth:`Cluster._server_user`); root still reaches
the socket because root passes any permission check.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import platformdirs
import psycopg

__all__ = ["Cluster", "EmbeddedError", "default_cluster", "find_bindir", "server_version"]

log = logging.getLogger(__name__)

PORT = 5432
FALLBACK_USER = "crh-embedded"
MANAGED_CONF = "crh_embedded.conf"
# sun_path holds 108 bytes on Linux and 104 on macOS; stay clear of both.
SOCKET_PATH_MAX = 100
_REQUIRED_BINARIES = ("postgres", "initdb", "pg_ctl", "createdb")
_LOG_TAIL_LINES = 20


class EmbeddedError(Exception):
    """The embedded cluster could not be found, set up, started or stopped."""


@dataclass(frozen=True)
class _ServerUser:
    """The OS account the server runs as when cr_queue itself runs as root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def from_pwd(cls, entry: pwd.struct_passwd) -> _ServerUser:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def find_bindir(env: Mapping[str, str] | None = None, *, major: str | None = None) -> Path:
    """Where ``postgres``, ``initdb`` and ``pg_ctl`` are.

    The system's installation comes first because distributions patch and
    update it; the pgserver wheel is the fallback that makes a pip install
    enough.  ``major`` asks for a given major version, so an existing cluster
    is not handed to a newer server that cannot read its files.
    """
    env = os.environ if env is None else env
    explicit = env.get("CRH_PG_BINDIR")
    if explicit:
        bindir = Path(explicit)
        if not _has_server_binaries(bindir):
            raise EmbeddedError(
                f"CRH_PG_BINDIR={explicit} does not contain {', '.join(_REQUIRED_BINARIES)}; "
                "point it to the bin directory of a PostgreSQL server installation, or unset it"
            )
        return bindir
    found: list[Path] = []
    for bindir in _candidate_bindirs(env):
        if bindir in found or not _has_server_binaries(bindir):
            continue
        found.append(bindir)
        if major is None or _major(server_version(bindir)) == major:
            return bindir
    if found:
        versions = ", ".join(f"{server_version(b)} in {b}" for b in found)
        raise EmbeddedError(
            f"the embedded cluster needs PostgreSQL {major} but only found {versions}; "
            f"install PostgreSQL {major} server binaries and set CRH_PG_BINDIR to their bin "
            "directory, or move the old cluster away to start a new empty one"
        )
    raise EmbeddedError(
        "no PostgreSQL server binaries (postgres, initdb, pg_ctl) found for the embedded "
        "database; install them (Debian: apt install postgresql), or `pip install pgserver`, "
        "or configure a database server with --db, CRH_DATABASE_URL or [database] url"
    )


def _candidate_bindirs(env: Mapping[str, str]) -> Iterator[Path]:
    search_path = env.get("PATH", os.defpath)
    pg_config = shutil.which("pg_config", path=search_path)
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            yield Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    yield from (Path(p) for p in sorted(versioned, key=_debian_version_key, reverse=True))
    postgres = shutil.which("postgres", path=search_path)
    if postgres:
        yield Path(postgres).resolve().parent
    wheel = _pgserver_bindir()
    if wheel is not None:
        yield wheel


def _debian_version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _pgserver_bindir() -> Path | None:
    """The wheel's binaries, located without importing it (its import chmods dirs)."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


@functools.lru_cache(maxsize=None)
def server_version(bindir: Path) -> str:
    """The server's version, e.g. "16.2"; root may ask, only running needs a user."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(
            f"cannot run {bindir / 'postgres'} --version ({exc}); "
            "check the PostgreSQL installation or set CRH_PG_BINDIR"
        ) from exc
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
    return match.group(1) if match else out.strip()


def _major(version: str) -> str:
    """Major version as PG_VERSION writes it: "16" for 16.2, "9.6" for 9.6.24."""
    parts = re.findall(r"\d+", version)
    if not parts:
        return version
    return parts[0] if int(parts[0]) >= 10 else ".".join(parts[:2])


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
            "server_user": self._server_user_name(),
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
        self._make_private_dir(self.datadir, user)
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
        self._make_private_dir(self.datadir / "log", user)
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "\n# cr_queue: the settings of the embedded cluster live in the file below,\n"
                "# which cr_queue rewrites at every start.\n"
                f"include_if_exists = '{MANAGED_CONF}'\n"
            )

    def _no_instructions(self) -> list[str]:
        """initdb learnt --no-instructions in PostgreSQL 14; Debian 11 still ships 13."""
        first = _major(server_version(self.bindir)).split(".")[0]
        return ["--no-instructions"] if first.isdigit() and int(first) >= 14 else []

    def _write_managed_conf(self, user: _ServerUser | None) -> None:
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
        self._own(path, user, 0o600)

    def _prepare_socket_dir(self, user: _ServerUser | None) -> None:
        socket_dir = self.socket_dir
        if socket_dir == self.datadir:
            return
        owner = user.uid if user is not None else os.geteuid()
        try:
            socket_dir.mkdir(mode=0o700)
            self._own(socket_dir, user, 0o700)
        except FileExistsError:
            pass
        info = socket_dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner:
            raise EmbeddedError(
                f"socket directory {socket_dir} exists but is not a directory owned by uid "
                f"{owner}; remove it (someone else may have created it) and start again"
            )
        self._own(socket_dir, user, 0o700)

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

    # -- the server's OS user -----------------------------------------------

    def _server_user(self) -> _ServerUser | None:
        """None means "this process"; as root, the account the server runs as.

        An existing cluster keeps its owner; a new one goes to CRH_EMBEDDED_USER,
        else the distribution's ``postgres``, else a ``crh-embedded`` system user.
        """
        if os.geteuid() != 0:
            return None
        if self.initialized:
            owner = self.datadir.stat().st_uid
            if owner != 0:
                return _ServerUser.from_pwd(pwd.getpwuid(owner))
        wanted = self._env.get("CRH_EMBEDDED_USER")
        for name in ([wanted] if wanted else ["postgres", FALLBACK_USER]):
            try:
                return _ServerUser.from_pwd(pwd.getpwnam(name))
            except KeyError:
                if wanted:
                    raise EmbeddedError(
                        f"CRH_EMBEDDED_USER={wanted} is not an OS user; create it or unset "
                        "CRH_EMBEDDED_USER (PostgreSQL cannot run as root)"
                    ) from None
        return _ServerUser.from_pwd(_create_system_user(FALLBACK_USER))

    def _server_user_name(self) -> str | None:
        """Who runs (or would run) the server, without creating anyone."""
        if os.geteuid() != 0:
            uid = os.geteuid()
        elif self.initialized:
            uid = self.datadir.stat().st_uid
        else:
            return None
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    def _run(self, args: Sequence[str], *, timeout: float | None) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the server user when we are root (no shell, no runuser)."""
        user = self._server_user()
        env = {k: v for k, v in self._env.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, object] = {}
        if user is not None:
            # Checked before every command, not once: tools such as pytest
            # reset their temp roots to 0700 while our server keeps running.
            self._grant_traverse(self.datadir, user)
            self._grant_traverse(Path(args[0]), user)
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
            env["HOME"] = str(self.datadir)
            env["USER"] = env["LOGNAME"] = user.name
        try:
            return subprocess.run(
                list(args), capture_output=True, text=True, env=env, cwd="/",
                stdin=subprocess.DEVNULL, timeout=timeout, **kwargs,  # type: ignore[arg-type]
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise self._error(f"cannot run {args[0]} ({exc})") from exc

    @staticmethod
    def _make_private_dir(path: Path, user: _ServerUser | None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        Cluster._own(path, user, 0o700)

    @staticmethod
    def _own(path: Path, user: _ServerUser | None, mode: int) -> None:
        if user is not None:
            os.chown(path, user.uid, user.gid)
        os.chmod(path, mode)

    @staticmethod
    def _grant_traverse(path: Path, user: _ServerUser) -> list[Path]:
        """Let the server user pass through every ancestor of ``path``, and no more.

        Only the execute (search) bit of the class the user falls in is added:
        it may enter the directories but cannot list them.
        """
        granted: list[Path] = []
        for ancestor in reversed(Path(path).absolute().parents):
            info = ancestor.stat()
            if info.st_uid == user.uid:
                bit = stat.S_IXUSR
            elif info.st_gid in user.groups:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if info.st_mode & bit:
                continue
            os.chmod(ancestor, stat.S_IMODE(info.st_mode) | bit)
            granted.append(ancestor)
        if granted:
            log.warning(
                "gave OS user %s traverse-only permission (x, not read) on %s so the embedded "
                "PostgreSQL server can reach %s",
                user.name, ", ".join(map(str, granted)), path,
            )
        return granted

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


def _create_system_user(name: str) -> pwd.struct_passwd:
    """Only when root and no ``postgres`` user exists: someone must own the cluster."""
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, timeout=60,
        )
        detail = result.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        result, detail = None, str(exc)
    # Exit code 9: another command created the same user a moment ago.
    if result is None or result.returncode not in (0, 9):
        raise EmbeddedError(
            f"cannot create the system user {name} to run the embedded PostgreSQL server "
            f"as (PostgreSQL refuses to run as root): {detail}; create an unprivileged user "
            "and set CRH_EMBEDDED_USER to it, or run cr_queue as a normal user"
        )
    if result.returncode == 0:
        log.warning("created system user %s to run the embedded PostgreSQL server", name)
    return pwd.getpwnam(name)
