"""The world of one fault run: its own PostgreSQL, workers, proxy, scratch filesystems and tree.

Everything is started here and torn down by :meth:`World.close`: processes
are killed by their own pid, the tmpfs is unmounted, the cluster stopped and
its directory removed, so a run leaves the machine as it found it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from cr_queue.db import migrate
from cr_queue.db.embedded import PORT, Cluster
from cr_queue.tomodir import synth

from ..conftest import commands_env, script
from ..faults import FreezableProxy
from .plan import Behaviour, Plan

POLL = "0.5"


@dataclass
class Tomodir:
    path: Path
    batch: int
    tag: str
    behaviour: Behaviour
    inputs: dict[str, str]  # relative path -> sha256, as made


@dataclass
class WorkerRun:
    """One crh_worker process; ``ended_by`` says who ended it (None: nobody, yet)."""

    name: str
    proc: subprocess.Popen
    err_path: Path
    out_path: Path
    workdir: Path
    quit_when_empty: bool
    through_proxy: bool
    ended_by: str | None = None
    stopped: bool = False  # SIGSTOPped now

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@dataclass
class World:
    plan: Plan
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="crh-fault-run-")))

    def __post_init__(self) -> None:
        self.tree = self.home / "tree"
        self.marks = self.home / "marks"
        self.logs = self.home / "logs"
        self.scratch = self.home / "scratch"
        for d in (self.tree, self.marks, self.logs, self.scratch):
            d.mkdir(parents=True)
        # fsync off is safe here: the faults stop PostgreSQL, never the machine.
        # synchronous_commit stays on: with it off, an immediate stop loses
        # commits a client was told of, which no production server does (a run
        # with it off saw a claim vanish and the solver run twice on one claim).
        self.cluster = Cluster(self.home / "pg" / "data", extra_conf={"fsync": "off", "full_page_writes": "off"})
        self.workers: list[WorkerRun] = []
        self.commands: list[subprocess.Popen] = []
        self.tomodirs: list[Tomodir] = []
        self.mounts: list[Path] = []
        self.proxy: FreezableProxy | None = None
        self.db_lock = threading.Lock()  # one database fault at a time
        self._serial = 0
        self._serial_lock = threading.Lock()

    # ---------------------------------------------------------- database

    def start(self) -> None:
        self.cluster.start()
        self.db_url = self.cluster.url
        migrate.upgrade(self.db_url)
        self.env = commands_env(self.db_url, self.home)
        self.env["CRH_STANDIN_MARK"] = str(self.marks)
        self.proxy = FreezableProxy(self.cluster.socket_dir / f".s.PGSQL.{PORT}")
        self.proxy_url = f"host=127.0.0.1 port={self.proxy.port} user={self.cluster.superuser} dbname={self.cluster.dbname}"

    def db_stop(self, mode: str) -> None:
        self.cluster.stop(mode=mode)

    def db_start(self) -> None:
        self.cluster.start(timeout=120)

    def sql(self, query: str, params=()) -> list[tuple]:
        with psycopg.connect(self.db_url, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(query, params).fetchall()

    # -------------------------------------------------------------- tree

    def make_batch(self, batch: int) -> list[Tomodir]:
        """A batch of tomodirs in tree/bNNN/ (the hanging ones in tree/bNNN-timeout/, added with --timeout)."""
        made = []
        for i in range(self.plan.batch_size):
            behaviour = self.plan.behaviour()
            sub = f"b{batch:03d}-timeout" if behaviour.name == "hang" else f"b{batch:03d}"
            tag = f"b{batch:03d}-{i:03d}-{behaviour.name}"
            path = synth.make_tomodir(self.tree / sub / tag, behaviour.kind, nx=6, nz=3, seed=batch * 1000 + i)
            settings = {"tag": tag, **behaviour.settings}
            (path / "exe" / "standin.cfg").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
            td = Tomodir(path, batch, tag, behaviour, digests(path))
            made.append(td)
        self.tomodirs += made
        return made

    def batch_dirs(self, batch: int) -> list[tuple[Path, list[str]]]:
        """(directory, extra crh_add options) of a batch."""
        dirs = []
        for suffix, extra in (("", []), ("-timeout", ["--timeout", f"{self.plan.timeout_s}s"])):
            d = self.tree / f"b{batch:03d}{suffix}"
            if d.exists():
                dirs.append((d, extra))
        return dirs

    # ---------------------------------------------------------- commands

    def _next_serial(self) -> int:
        """A number for a log file or worker name, unique across the run's threads."""
        with self._serial_lock:
            self._serial += 1
            return self._serial

    def command(self, args: list[str], name: str) -> subprocess.Popen:
        serial = self._next_serial()
        out_path, err_path = self.logs / f"{serial:04d}-{name}.out", self.logs / f"{serial:04d}-{name}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=err)
        proc.out_path = out_path  # type: ignore[attr-defined]
        proc.err_path = err_path  # type: ignore[attr-defined]
        self.commands.append(proc)
        return proc

    # ----------------------------------------------------------- workers

    def small_scratch(self) -> Path:
        """A tmpfs of plan.scratch_bytes for one worker's --workdir (root only)."""
        where = self.scratch / "small"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.plan.scratch_bytes}", "tmpfs", str(where)], check=True)
        self.mounts.append(where)
        return where

    def start_worker(self, *, quit_when_empty: bool = False, through_proxy: bool = False, workdir: Path | None = None) -> WorkerRun:
        name = f"w{self._next_serial():04d}" + ("-q" if quit_when_empty else "") + ("-proxy" if through_proxy else "")
        if workdir is None:
            workdir = self.scratch / name
            workdir.mkdir()
        err_path, out_path = self.logs / f"{name}.err", self.logs / f"{name}.out"
        env = dict(self.env)
        if through_proxy:
            env["CRH_DATABASE_URL"] = self.proxy_url
        args = [
            script("crh_worker"), "--name", name, "--workdir", str(workdir), "--poll", POLL, "--json",
            "--log-level", "info", "--jobs", "2", "--lease", str(self.plan.lease_s),
        ]
        if quit_when_empty:
            args.append("-q")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=err)
        worker = WorkerRun(name, proc, err_path, out_path, workdir, quit_when_empty, through_proxy)
        self.workers.append(worker)
        return worker

    def live_workers(self, *, steady: bool = True) -> list[WorkerRun]:
        """Running workers we have not ended (``steady``: only those not started with -q)."""
        return [
            w for w in self.workers
            if w.proc.poll() is None and w.ended_by is None and not (steady and w.quit_when_empty)
        ]

    def signal_worker(self, worker: WorkerRun, sig: int) -> None:
        if worker.proc.poll() is None:
            os.kill(worker.proc.pid, sig)

    # -------------------------------------------------------------- end

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.unfreeze()
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    os.kill(w.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                w.proc.kill()
            w.proc.wait()
        for proc in self.commands:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self.proxy is not None:
            self.proxy.close()
        for where in self.mounts:
            subprocess.run(["umount", "-l", str(where)], check=False)
        self.mounts = []
        try:
            self.cluster.stop(mode="immediate")
        except Exception:  # noqa: BLE001 - the rest of the clean-up must still happen
            pass

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def written(self) -> list[dict]:
        """The stand-in's records of what each run wrote (see standin_settings.record)."""
        d = self.marks / "written"
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []

    def runs(self) -> list[tuple[int, str, str]]:
        log = self.marks / "runs.log"
        if not log.exists():
            return []
        return [(int(p), s, c) for p, s, c in (line.split(" ", 2) for line in log.read_text().splitlines())]


def now() -> float:
    return time.monotonic()
