"""Shared helpers of the benchmarks: a throwaway cluster, timing, result rows.

Every benchmark compares a figure with a reference measured in the same run
on the same machine, because this machine is shared and noisy: absolute
times mean little, ratios taken minutes apart mean little more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import conninfo, sql

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cr_queue.db import migrate  # noqa: E402
from cr_queue.db.embedded import Cluster  # noqa: E402


# ----------------------------------------------------------------- options


def size_options(description: str, smoke: str) -> tuple[argparse.Namespace, int, int]:
    """The command line of a benchmark over a large queue (status_100k, web_100k).

    Returns the options and the number of jobs and of timed runs they ask for: ``--jobs``
    and ``--runs``, or with ``--smoke`` (help text ``smoke``) 2,000 jobs and 2 runs, which
    check that the benchmark works without judging its times.  One definition, so the two
    benchmarks keep taking the same options with the same meaning.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--db", help="an existing migrated, empty database (default: a throwaway cluster)")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help=smoke)
    args = parser.parse_args()
    n, runs = (2000, 2) if args.smoke else (args.jobs, args.runs)
    return args, n, runs


# ----------------------------------------------------------------- worker runs


class WorkerHome:
    """The scratch of a benchmark that runs real workers against its own cluster
    (requeue_time, soak): the cluster (not started yet), ``tree`` where the jobs are
    registered from, the workers' ``workdir`` and their ``logs``.

    The cluster runs without fsync: these runs measure cr_queue, not the disk, and the
    data is thrown away.  One definition, so both benchmarks run on the same settings.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.cluster = Cluster(home / "pg", extra_conf={"fsync": "off", "synchronous_commit": "off"})
        self.tree = home / "tree"
        self.workdir = home / "workdir"
        self.logs = home / "logs"
        for d in (self.tree, self.workdir, self.logs):
            d.mkdir(parents=True)

    @property
    def url(self) -> str:
        return self.cluster.url


# ----------------------------------------------------------------- results


@dataclass
class Row:
    """One measure: the figure, its reference from the same run, the verdict."""

    name: str
    figure: str
    reference: str = "—"
    ratio: str = "—"
    target: str = "—"
    ok: bool | None = None  # None: reported only, no target
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "INFO"}[self.ok]

    def line(self) -> str:
        text = (
            f"{self.verdict:4}  {self.name:<44} {self.figure:<26} ref {self.reference:<30} "
            f"ratio {self.ratio:<8} target {self.target}"
        )
        return text + (f"  ({self.note})" if self.note else "")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(row.line(), flush=True)
        return row

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def markdown(self) -> str:
        lines = ["| verdict | measure | figure | reference (same run) | ratio | target |", "|---|---|---|---|---|---|"]
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        for r in self.rows:
            note = f" ({r.note})" if r.note else ""
            cells = (r.verdict, r.name + note, r.figure, r.reference, r.ratio, r.target)
            lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
        return "\n".join(lines)


# ------------------------------------------------------------------ timing


def console_script(name: str, prog: str) -> str:
    """Path of an installed cr_queue console script; the benchmarks run the real commands."""
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not os.path.exists(found):
        sys.exit(f"{prog}: console script {name} not found: pip install -e {REPO}")
    return found


def bytecode_env(env: dict[str, str], scratch: Path) -> dict[str, str]:
    """Let the commands run from compiled bytecode, as an installed cr_queue does.

    A real installation (pip install, the Debian package) has its modules
    compiled; a sandbox that sets PYTHONDONTWRITEBYTECODE=1 makes every
    command compile cr_queue's modules from source on every start (about
    70 ms a run), which is no figure of cr_queue's.  The cache goes to
    ``scratch/pycache`` (PYTHONPYCACHEPREFIX, so nothing is written into the
    repository or site-packages) and is filled by the first run, or before
    timing by :func:`compile_bytecode`.  With a prefix, Python ignores the
    ``__pycache__`` directories beside the sources, the standard library's
    included: the prefix holds all the bytecode the commands use.
    """
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    return env


# What the commands import, compiled before any timing; the standard library's
# modules are compiled by a run of each command, which imports them.
BYTECODE_PACKAGES = ("cr_queue", "cr_queue.db.migrations", "psycopg", "psycopg_binary", "click", "zstandard", "platformdirs")


def compile_bytecode(env: dict[str, str], commands: Iterable[str]) -> None:
    """Fill ``env``'s PYTHONPYCACHEPREFIX before timing: compileall of the packages
    (every module, also those imported only on some paths), then ``-Q --help`` of
    each console script in ``commands`` for the standard library modules (with
    -Q as the timed runs give it: click's parser then imports difflib)."""
    import importlib.util

    dirs: list[str] = []
    for name in BYTECODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += list(spec.submodule_search_locations)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], env=env, check=True, stdout=subprocess.DEVNULL)
    for command in commands:
        subprocess.run([command, "-Q", "--help"], env=env, check=True, stdout=subprocess.DEVNULL)


def standin_env(home: Path, url: str, prog: str, **extra: str) -> dict[str, str]:
    """Environment for the commands against ``url`` with the stand-in solvers, clean of
    the caller's own CRH_*/PG* settings and config files; compiled bytecode is
    cached under ``home`` (:func:`bytecode_env`)."""
    env = bytecode_env({k: v for k, v in os.environ.items() if not k.startswith(("CRH_", "PG"))}, home)
    env.update(
        {
            "CRH_DATABASE_URL": url,
            "CRH_CRMOD": console_script("crh_standin_crmod", prog),
            "CRH_CRTOMO": console_script("crh_standin_crtomo", prog),
            "CRH_SYSTEM_CONFIG": str(home / "no-system-config.toml"),
            "XDG_CONFIG_HOME": str(home / "xdg"),
            "NO_COLOR": "1",
            **extra,
        }
    )
    return env


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: with 100 samples p99 is the 99th smallest."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), -(-int(p * len(ordered) * 1000) // 100000)))
    return ordered[rank - 1]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sh(command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, check=True, executable="/bin/bash", **kw)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------- database


class BenchCluster:
    """A throwaway PostgreSQL cluster for one bench run, with default durability.

    fsync and synchronous_commit stay on: the claim, dispatch and pgbench
    figures are about what a real installation commits.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self._template: str | None = None
        conf = {"max_connections": "300", "shared_buffers": "256MB"}
        self.has_pg_stat_statements = _has_library("pg_stat_statements")
        if self.has_pg_stat_statements:
            # Counts the claim statements of the herd measure.
            conf["shared_preload_libraries"] = "pg_stat_statements"
        self.cluster = Cluster(home / "pg", extra_conf=conf)

    def __enter__(self) -> BenchCluster:
        self.cluster.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.stop(mode="immediate")

    @property
    def bindir(self) -> Path:
        return self.cluster.bindir

    def new_database(self) -> str:
        """A fresh, migrated database (a copy of one migrated template); returns its URL."""
        if self._template is None:
            self._template = f"bt_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(self.cluster.url, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self._template)))
            migrate.upgrade(conninfo.make_conninfo(self.cluster.url, dbname=self._template))
        name = f"b_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.cluster.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(self._template)))
        return conninfo.make_conninfo(self.cluster.url, dbname=name)

    def checkpoint(self) -> None:
        """Write out what earlier rows left in shared buffers now, so a checkpoint
        started by their writes does not fall into the next row's timed runs."""
        with psycopg.connect(self.cluster.url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def drop_database(self, url: str) -> None:
        name = conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.cluster.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        removed()


def _has_library(name: str) -> bool:
    """Whether the server cr_queue would start can load this contrib module."""
    from cr_queue.db.embedded import EmbeddedError, find_bindir

    try:
        bindir = find_bindir()
    except EmbeddedError:
        return False
    candidates = [bindir.parent / "lib" / f"{name}.so", bindir.parent / "lib" / "postgresql" / f"{name}.so"]
    pg_config = bindir / "pg_config"
    if pg_config.exists():
        try:
            out = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True, text=True, timeout=10)
            candidates.append(Path(out.stdout.strip()) / f"{name}.so")
        except (OSError, subprocess.SubprocessError):
            pass
    return any(p.exists() for p in candidates)


def pgbench_path() -> str | None:
    from cr_queue.db.embedded import EmbeddedError, find_bindir

    try:
        beside = find_bindir() / "pgbench"
        if beside.exists():
            return str(beside)
    except EmbeddedError:
        pass
    return shutil.which("pgbench")


def pg_env(url: str) -> dict[str, str]:
    """libpq environment variables for pgbench/psql from a cr_queue URL."""
    info = conninfo.conninfo_to_dict(url)
    env = dict(os.environ)
    env.update({"PGHOST": info["host"], "PGPORT": str(info.get("port", 5432)), "PGUSER": info["user"], "PGDATABASE": info["dbname"]})
    return env


def scratch(prefix: str = "crq-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# ext4 without a journal (this VM's disk is one) does not reuse an inode for a
# minute after it was freed while its inode table block is cached, and every
# new file or directory scans past each such inode of its block group
# (recently_deleted() in fs/ext4/ialloc.c).  A command that creates files
# within that minute of thousands being deleted spends most of its system
# time there, and so does the reference beside it, by an amount that depends
# on which groups each lands in: the retrieve rows swung between 0.37x and
# 1.07x on it.  Users do not delete thousands of files seconds before
# crh_add or crh_retrieve; the benchmarks' own clean-up did, so timed runs
# wait until the bench's last deletion is this long ago (see settle()).
RECENT_DELETION_S = 61.0
_last_removal = 0.0


def removed() -> None:
    """Note that something outside rmtree() just deleted files (a worker's scratch, a DROP DATABASE)."""
    global _last_removal
    _last_removal = time.monotonic()


def rmtree(path: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        removed()


def settle(wait: bool = True) -> float:
    """Write everything back, then (``wait``) sleep until the bench's last deletion is
    RECENT_DELETION_S ago, so timed commands and their references create files under
    the same conditions; returns the seconds waited."""
    subprocess.run(["sync"], check=True)
    if not wait:
        return 0.0
    left = _last_removal + RECENT_DELETION_S - time.monotonic()
    if left > 0:
        time.sleep(left)
        subprocess.run(["sync"], check=True)
    return max(left, 0.0)
