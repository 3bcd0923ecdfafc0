"""cr_queue's benchmarks: every row of issue 6, each against a reference measured in the same run.

    bench/run                 # the full table (about 5-10 minutes on 2 cores)
    bench/run --smoke         # seconds: every row on tiny sizes, correctness only
    bench/run --only add,dispatch --reps 5
    bench/run --markdown FILE # also write the table as markdown (docs/performance.md)

One line per measure: PASS/FAIL/INFO, the figure, the reference measured in
the same run, their ratio and the target.  Exit status 1 when a target is
missed (with --smoke: only when something is incorrect: a lost or duplicated
job, a failed command), 0 otherwise.

Everything runs against a throwaway PostgreSQL cluster started for this run
(default durability: fsync and synchronous_commit on) and the real commands
(crh_add, crh_worker, crh_retrieve) as subprocesses.  The solver is a tiny C
program written and compiled here (bench/tiny_solver.c) that writes the
expected output and exits, logging its own start and end times, so dispatch
latency and worker overhead are measured against the solver's own clock.
Needs: zstd, tar, xz (the cr_hydra reference uses Python's lzma), cc, pgbench
(from /usr/lib/postgresql/*/bin).  Rows: add, retrieve, dispatch, overhead,
herd, throughput, claim, status, web, rss, many, fleet (bench/fleet.py: 50-200
idle workers, a restart, 5,000 tiny jobs, a campaign).

The commands run from compiled bytecode, as in any installation: with
PYTHONDONTWRITEBYTECODE set (as some sandboxes do) each start would compile
cr_queue's modules from source again, some 70 ms of every timed command.  The
bench drops that variable and caches the bytecode in its scratch directory
(PYTHONPYCACHEPREFIX, nothing written into the repository), compiled once
before the first measure (benchlib.bytecode_env, benchlib.compile_bytecode).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
import psycopg  # noqa: E402

from cr_queue import add as add_service  # noqa: E402
from cr_queue.tomodir import archive
from cr_queue.queries import jobs, workers
from cr_queue import store
from cr_queue.tomodir import synth  # noqa: E402
from cr_queue.db.connection import Database  # noqa: E402

ROWS = ("add", "retrieve", "dispatch", "overhead", "herd", "throughput", "claim", "status", "web", "rss", "many", "fleet")


@dataclass
class Sizes:
    tree_bytes: int
    reps: int  # of each timed add and retrieve run: medians of 5 are steadier on a shared machine
    dispatch_n: int
    overhead_n: int
    herd_workers: int
    herd_n: int
    throughput_n: int
    pgbench_s: int
    claim_queue: int
    claim_n: int
    rss_bytes: int
    many_workers: int
    many_jobs: int


FULL = Sizes(100_000_000, 5, 100, 100, 8, 40, 400, 10, 100_000, 1000, 1_000_000_000, 32, 2000)
SMOKE = Sizes(2_000_000, 1, 5, 10, 2, 4, 16, 1, 2_000, 50, 20_000_000, 3, 30)


# --------------------------------------------------------------------------- context

SHELL_SOLVER = """#!/bin/sh
start=$(date +%s.%N)
if [ -f bench_sleep ]; then sleep "$(cat bench_sleep)"; elif [ -n "$CRQ_BENCH_SLEEP" ]; then sleep "$CRQ_BENCH_SLEEP"; fi
case "$0" in
    *crtomo) printf 'bench\\n***finished***\\n' > ../inv/inv.ctr ;;
    *) printf '1\\n10002 40003 1.0E+00 0.0E+00\\n' > ../mod/volt.dat ;;
esac
[ -n "$CRQ_BENCH_COPY" ] && cp "${CRQ_BENCH_COPY%%:*}" "${CRQ_BENCH_COPY#*:}"
end=$(date +%s.%N)
[ -n "$CRQ_BENCH_LOG" ] && echo "$start $end $(cat bench_id 2>/dev/null || echo -) $(pwd)" >> "$CRQ_BENCH_LOG"
exit 0
"""


class Context:
    def __init__(self, args, sizes: Sizes, work: Path, cluster: bl.BenchCluster) -> None:
        self.args = args
        self.smoke = args.smoke
        self.sizes = sizes
        self.work = work
        self.cluster = cluster
        self.report = bl.Report()
        self.solver_dir = work / "solver"
        self.log = work / "solver.log"
        self._tree: Path | None = None

    # -- the tiny solver

    def build_solver(self) -> None:
        """The tiny C solver; a shell script doing the same where no C compiler is installed."""
        self.solver_dir.mkdir()
        source = Path(__file__).resolve().parent / "tiny_solver.c"
        compiler = shutil.which("cc") or shutil.which("gcc")
        for name in ("crmod", "crtomo"):
            # Two files, not links: the worker resolves links to their target's name.
            target = self.solver_dir / name
            if compiler:
                subprocess.run([compiler, "-O2", "-o", str(target), str(source)], check=True)
            else:
                target.write_text(SHELL_SOLVER)
                target.chmod(0o755)
        self.solver_kind = "C" if compiler else "sh (no C compiler: the solver's own runtime includes a shell)"

    # -- commands

    def env(self, url: str, *, store_path: Path | None = None, log: Path | None = None, copy: str = "") -> dict[str, str]:
        """The commands' environment: this run's database, config and solver; bytecode
        cached in the scratch directory (benchlib.bytecode_env: an installed cr_queue
        does not compile its modules on every start, so the timed commands must not)."""
        env = dict(os.environ)
        for key in list(env):
            if key.startswith(("CRH_", "CRQ_BENCH_")):
                del env[key]
        bl.bytecode_env(env, self.work)
        config = self.work / f"config-{store_path.name if store_path else 'db'}.toml"
        config.write_text(f'[store]\npath = "{store_path}"\n' if store_path else "")
        env.update(
            {
                "CRH_DATABASE_URL": url,
                "CRH_CONFIG": str(config),
                "CRH_SYSTEM_CONFIG": str(self.work / "no-system-config.toml"),
                "CRH_CRMOD": str(self.solver_dir / "crmod"),
                "CRH_CRTOMO": str(self.solver_dir / "crtomo"),
                "CRQ_BENCH_LOG": str(log or self.log),
                "CRQ_BENCH_COPY": copy,
                "NO_COLOR": "1",
            }
        )
        return env

    def compile_bytecode(self) -> None:
        """Compile what the commands import before anything is timed (see env())."""
        bl.compile_bytecode(
            self.env("postgresql:///unused"), [crh(name) for name in ("crh_add", "crh_retrieve", "crh_worker", "crh_status")]
        )

    def database(self, url: str, store_path: Path | None = None) -> Database:
        return _database(url, store_path)

    # -- data

    def tree(self) -> Path:
        """The synthetic tree of tomodirs (numeric text), made once per run."""
        if self._tree is None:
            self._tree = self.work / "tree"
            synth.make_tree_of_size(self._tree, self.sizes.tree_bytes, kind="inv")
        return self._tree


def _database(url: str, store_path: Path | None) -> Database:
    chosen = store.DirectoryStore(store_path) if store_path else store.DATABASE
    return Database(url=url, source="bench", embedded=False, store=chosen)


def crh(name: str) -> str:
    """The installed console script itself (a pyenv shim would add a bash and a fork per call)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def run(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def tiny_tomodir(path: Path, token: str, kind: str = "mod") -> Path:
    synth.make_tomodir(path, kind, nx=8, nz=4, seed=hash(token) & 0xFFFF)
    (path / "exe" / "bench_id").write_text(token + "\n")
    return path


def read_solver_log(path: Path) -> list[tuple[float, float, str, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        start, end, token, cwd = line.split(" ", 3)
        out.append((float(start), float(end), token, cwd))
    return out


def job_of_cwd(cwd: str) -> int | None:
    m = re.search(r"job(\d+)", cwd)
    return int(m.group(1)) if m else None


def wait_for(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def start_workers(ctx: Context, url: str, n: int, *, quit_when_empty: bool, log: Path, extra: list[str] | None = None, copy: str = "") -> list[subprocess.Popen]:
    env = ctx.env(url, log=log, copy=copy)
    args = [crh("crh_worker"), "-j", "1", "--log-level", "warning", "-Q"] + (["-q"] if quit_when_empty else []) + (extra or [])
    return [
        subprocess.Popen(args + ["--name", f"bench-{i}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]


def stop_workers(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_workers(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_workers(procs)
            raise RuntimeError("workers did not finish in time")
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"crh_worker exited {bad[0].returncode}: {bad[0].stderr.read()[-3000:] if bad[0].stderr else ''}")


def idle_workers(url: str, n: int, timeout: float = 120) -> None:
    """Wait until n workers registered and their slots had time to go idle on LISTEN."""

    def ready() -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM workers WHERE state = 'running'").fetchone()[0] >= n

    if not wait_for(ready, timeout, 0.1):
        raise RuntimeError(f"{n} workers did not start within {timeout} s")
    time.sleep(1.0)


def queue_tiny_jobs(ctx: Context, url: str, n: int, prefix: str, sleep_s: float = 0.0) -> list[int]:
    """n queued jobs sharing one tiny input archive: registration is not what is measured here.
    ``sleep_s``: the tiny solver sleeps that long in each (exe/bench_sleep)."""
    src = tiny_tomodir(ctx.work / f"{prefix}-input", prefix)
    if sleep_s:
        (src / "exe" / "bench_sleep").write_text(f"{sleep_s:g}\n")
    db = ctx.database(url)
    with db.connect("bench") as conn:
        sha = store.put_tree(conn, db.store, src).sha256
        rows = conn.execute(
            """
            INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file,
                                    input_sha256, datetime_queued)
            SELECT 'queued', 'mod', 'bench', 'benchhost', %(p)s || g, %(p)s || g || '.crh', %(sha)s, now()
            FROM generate_series(1, %(n)s) g
            RETURNING id
            """,
            {"p": f"/bench/{prefix}/td_", "sha": sha, "n": n},
        ).fetchall()
        conn.execute("ANALYZE inversions")
    return [r[0] for r in rows]


def event_times(url: str, event: str) -> dict[int, list[float]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT job_id, extract(epoch FROM datetime)::float8 FROM events WHERE event = %s ORDER BY id", (event,)
        ).fetchall()
    out: dict[int, list[float]] = {}
    for job_id, t in rows:
        out.setdefault(job_id, []).append(t)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio_row(
    ctx: Context,
    name: str,
    figure: str,
    reference: str,
    ratio: float,
    *,
    at_least: float,
    note: str,
    digits: int = 2,
    target: str | None = None,
) -> bl.Row:
    """A row judged by one ratio of our figure to the reference taken in the same run.

    It passes when ``ratio`` is at least ``at_least``; a smoke run's sizes are too small to
    judge, so there it is reported only.  One place for that rule, for every such row.
    """
    return bl.Row(
        name,
        figure,
        reference,
        f"{ratio:.{digits}f}x",
        target or f">= {at_least:g}x",
        None if ctx.smoke else ratio >= at_least,
        note=note,
    )


# --------------------------------------------------------------------------- add / retrieve


def cr_hydra_pack(tomodirs: list[Path]) -> None:
    """cr_hydra's crh_add: each tomodir as tar.xz in memory, then sha256 of the whole buffer."""
    for td in tomodirs:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
            tar.add(str(td), arcname=td.name, recursive=True)
        hashlib.sha256(buffer.getvalue()).hexdigest()


def solve_with_workers(ctx: Context, url: str, store_path: Path | None) -> None:
    """Run every queued job of the tree through real workers and the CRTomo stand-in
    (what a real inversion writes: inv.ctr, run.ctr, rhoNN.mag/.pha/.sig and voltNN.dat
    per iteration, exe/inv.lastmod, the solver log), as results come back in real use."""
    env = ctx.env(url, store_path=store_path)
    env["CRH_CRTOMO"] = bl.console_script("crh_standin_crtomo", "bench/run")
    env["CRH_CRMOD"] = bl.console_script("crh_standin_crmod", "bench/run")
    args = [crh("crh_worker"), "-j", "2", "-q", "-Q", "--log-level", "warning"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    wait_workers(procs, timeout=1800)
    bl.removed()  # each job's scratch directory
    with psycopg.connect(url, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM inversions WHERE status <> 'finished'").fetchone()[0]
    if left:
        raise RuntimeError(f"{left} jobs did not finish")


def copy_results(ctx: Context, url: str, store_path: Path | None, tree_copy: Path) -> None:
    """Finish every job with its inputs copied under inv/ as its result: as large as the
    input and eight files per tomodir (the smallest results; an INFO row)."""
    db = ctx.database(url, store_path)
    with db.connect("bench") as conn:
        wid = workers.register_worker(conn, name="bench", host="benchhost", pid=os.getpid(), version="bench", jobs=1, threads=1, groups=(), solvers={})
        actor = jobs.Actor(worker_id=wid)
        scratch = ctx.work / "copied-result"
        while (job := jobs.claim(conn, actor=actor, can_mod=True, can_inv=True, lease_s=3600)) is not None:
            bl.rmtree(scratch)
            (scratch / "inv").mkdir(parents=True)
            for f in sorted(Path(job.source_path).rglob("*")):
                if f.is_file():
                    shutil.copy2(f, scratch / "inv" / f"{f.parent.name}_{f.name}")
            sha = store.put_tree(conn, db.store, scratch).sha256
            assert jobs.complete(conn, job, result_sha256=sha, exit_code=0, actor=actor)
        bl.rmtree(scratch)


def results_reference(ctx: Context, url: str, store_path: Path | None, tree_copy: Path, name: str) -> tuple[Path, int, int]:
    """The results as one tar.zst (the reference's input): every job's result, unpacked
    where its tomodir is; returns the archive, the results' bytes and their file count."""
    results = ctx.work / f"results-{name}"
    bl.rmtree(results)
    db = ctx.database(url, store_path)
    with db.connect("bench") as conn:
        for job_id, source, sha in conn.execute("SELECT id, source_path, result_sha256 FROM inversions ORDER BY id").fetchall():
            buf = io.BytesIO()
            store.fetch(conn, db.store, sha, buf)
            buf.seek(0)
            archive.unpack(buf, results / Path(source).relative_to(tree_copy), limits=archive.Limits())
    files = sum(1 for p in results.rglob("*") if p.is_file())
    size = bl.tree_bytes(results)
    ref = ctx.work / f"results-{name}.tar.zst"
    bl.sh(f"tar -c -C {results} . | zstd -1 -q -f -o {ref}")
    bl.rmtree(results)
    return ref, size, files


def time_retrieve(
    ctx: Context, env: dict[str, str], copy: Path, url: str, ref: Path, n_tomodirs: int, reps: int, sign: str
) -> tuple[list[float], list[float]]:
    """crh_retrieve of the tree, ``reps`` times from the same state, each beside
    ``zstd -d | tar -x`` of the same results; returns both lists of times.
    ``sign``: a glob that matches one file of each retrieved result.  Nothing is
    deleted between the timed runs (a retrieved tree is moved aside, not removed,
    and the reference extracts into a new directory each time) and they start
    after benchlib.settle(): see RECENT_DELETION_S there."""
    pristine = ctx.work / "pristine"
    bl.rmtree(pristine)
    bl.sh(f"cp -a {copy} {pristine}")
    aside = ctx.work / "retrieved"
    aside.mkdir()
    dests = [ctx.work / f"untar-{rep}" for rep in range(reps)]
    for dest in dests:
        dest.mkdir()
    ctx.cluster.checkpoint()
    bl.settle(wait=not ctx.smoke)
    t_untar, t_ret = [], []
    for rep, dest in enumerate(dests):
        if rep:
            # Back to before the retrieval.
            copy.rename(aside / str(rep))
            bl.sh(f"cp -a {pristine} {copy}")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE inversions SET downloaded = false, datetime_downloaded = NULL")
        bl.settle(wait=False)
        t_untar.append(bl.timed(lambda: bl.sh(f"zstd -d -q -c {ref} | tar -x -C {dest}")))
        bl.settle(wait=False)
        t_ret.append(bl.timed(lambda: run([crh("crh_retrieve"), "-Q"], env, cwd=copy)))
        left = list(copy.rglob("*.crh"))
        if left:
            raise RuntimeError(f"crh_retrieve left {len(left)} .crh files")
        got = sum(1 for _ in copy.glob(f"site_*/td_*/{sign}"))
        if got != n_tomodirs:
            raise RuntimeError(f"crh_retrieve brought back {got} of {n_tomodirs} results")
    for path in [pristine, aside, *dests]:
        bl.rmtree(path)
    return t_untar, t_ret


def bench_add_retrieve(ctx: Context, store_kind: str, rows: set[str]) -> None:
    tree = ctx.tree()
    raw = bl.tree_bytes(tree)
    tomodirs = sorted(p for p in tree.glob("site_*/td_*"))
    reps = ctx.sizes.reps
    label = f"[{store_kind} store]"
    t_tool, t_add = [], []
    retrieve_rows: list[bl.Row] = []
    rate = lambda size, t: size / t / 1e6  # noqa: E731
    # Every repetition's database, store and copy first: nothing is deleted between
    # the timed runs, which start after benchlib.settle() (see RECENT_DELETION_S).
    urls = [ctx.cluster.new_database() for _ in range(reps)]
    store_paths = [ctx.work / f"store-{rep}" if store_kind == "dir" else None for rep in range(reps)]
    copies = [ctx.work / f"add-{store_kind}-{rep}" for rep in range(reps)]
    for store_path, copy in zip(store_paths, copies):
        if store_path:
            store_path.mkdir()
        bl.sh(f"cp -a {tree} {copy}")
    envs = [ctx.env(url, store_path=store_path) for url, store_path in zip(urls, store_paths)]
    ctx.cluster.checkpoint()
    bl.settle(wait=not ctx.smoke)
    for env, copy in zip(envs, copies):
        bl.settle(wait=False)
        t_tool.append(bl.timed(lambda: bl.sh(f"tar -c -C {tree} . | zstd -1 -q -c | sha256sum > /dev/null")))
        bl.settle(wait=False)
        t_add.append(bl.timed(lambda: run([crh("crh_add"), "-Q"], env, cwd=copy)))
        n_crh = len(list(copy.rglob("*.crh")))
        if n_crh != len(tomodirs):
            raise RuntimeError(f"crh_add registered {n_crh} of {len(tomodirs)} tomodirs")
    if "retrieve" in rows:
        url, store_path, copy, env = urls[0], store_paths[0], copies[0], envs[0]
        # The results of real workers running the CRTomo stand-in.
        solve_with_workers(ctx, url, store_path)
        ref, size, files = results_reference(ctx, url, store_path, copy, store_kind)
        untar, ret = (bl.median(t) for t in time_retrieve(ctx, env, copy, url, ref, len(tomodirs), reps, "inv/inv.ctr"))
        ratio = untar / ret
        retrieve_rows.append(
            ratio_row(
                ctx,
                f"crh_retrieve {bl.mb(size)} of results {label}",
                f"{rate(size, ret):.0f} MB/s ({ret:.2f} s)",
                f"zstd -d|tar -x {rate(size, untar):.0f} MB/s",
                ratio,
                at_least=0.5,
                note=f"median of {reps}, whole command incl. start-up; results of crh_worker + CRTomo stand-in: "
                f"{files} files, {len(tomodirs)} tomodirs",
            )
        )
        if not ctx.smoke:
            # The smallest results: each tomodir's inputs again, eight files of 1 MB in all.
            url2 = ctx.cluster.new_database()
            copy2 = ctx.work / f"copied-{store_kind}"
            bl.sh(f"cp -a {tree} {copy2}")
            env2 = ctx.env(url2, store_path=store_path)
            run([crh("crh_add"), "-Q"], env2, cwd=copy2)
            copy_results(ctx, url2, store_path, copy2)
            ref2, size2, files2 = results_reference(ctx, url2, store_path, copy2, f"{store_kind}-copied")
            untar2, ret2 = (bl.median(t) for t in time_retrieve(ctx, env2, copy2, url2, ref2, len(tomodirs), reps, "inv/grid_elem.dat"))
            retrieve_rows.append(
                bl.Row(
                    f"crh_retrieve {bl.mb(size2)}, inputs as results {label}",
                    f"{rate(size2, ret2):.0f} MB/s ({ret2:.2f} s)",
                    f"zstd -d|tar -x {rate(size2, untar2):.0f} MB/s",
                    f"{untar2 / ret2:.2f}x",
                    "report",
                    None,
                    note=f"median of {reps}; {files2} files: each tomodir's eight input files again",
                )
            )
            bl.rmtree(copy2)
            ctx.cluster.drop_database(url2)
    for url, store_path, copy in zip(urls, store_paths, copies):
        bl.rmtree(copy)
        if store_path:
            bl.rmtree(store_path)
        ctx.cluster.drop_database(url)
    tool, ours = bl.median(t_tool), bl.median(t_add)
    if "add" in rows:
        ratio = tool / ours
        ctx.report.add(
            ratio_row(
                ctx,
                f"crh_add {bl.mb(raw)} tree {label}",
                f"{rate(raw, ours):.0f} MB/s ({ours:.2f} s)",
                f"tar|zstd -1|sha256sum {rate(raw, tool):.0f} MB/s",
                ratio,
                at_least=0.5,
                note=f"median of {reps}, {len(tomodirs)} tomodirs, whole command incl. start-up",
            )
        )
        if store_kind == "db":
            # It runs at about 1 MB/s: a fifth of the tree gives the same rate in a fifth of the time.
            sample = tomodirs[: max(1, len(tomodirs) // 5)]
            sample_raw = sum(bl.tree_bytes(t) for t in sample)
            t_hydra = bl.timed(lambda: cr_hydra_pack(sample))
            hydra_rate = sample_raw / t_hydra / 1e6
            speedup = rate(raw, ours) / hydra_rate
            ctx.report.add(
                ratio_row(
                    ctx,
                    f"crh_add vs cr_hydra's method {label}",
                    f"{rate(raw, ours):.0f} MB/s",
                    f"tar.xz in memory + sha256 {hydra_rate:.1f} MB/s",
                    speedup,
                    at_least=5,
                    digits=1,
                    target=">= 5x faster",
                    note=f"reference without its upload, on {bl.mb(sample_raw)}",
                )
            )
    for row in retrieve_rows:
        ctx.report.add(row)


# --------------------------------------------------------------------------- dispatch and overhead


def bench_dispatch(ctx: Context) -> None:
    url = ctx.cluster.new_database()
    log = ctx.work / "dispatch.log"
    db = ctx.database(url)
    procs = start_workers(ctx, url, 1, quit_when_empty=False, log=log)
    latencies = []
    try:
        idle_workers(url, 1)
        for i in range(ctx.sizes.dispatch_n):
            td = tiny_tomodir(ctx.work / "dispatch" / f"td_{i:04d}", f"d{i}")
            report = add_service.add(db, [td], add_service.AddOptions())
            job_id = report.added[0].job_id

            def done() -> bool:
                with psycopg.connect(url, autocommit=True) as conn:
                    return conn.execute("SELECT status FROM inversions WHERE id = %s", (job_id,)).fetchone()[0] in ("finished", "failed")

            if not wait_for(done, 30, 0.02):
                raise RuntimeError(f"dispatch: job {job_id} not finished within 30 s")
            time.sleep(0.05 + (i % 5) * 0.02)  # the worker is idle again, waiting on LISTEN
    finally:
        stop_workers(procs)
    queued = event_times(url, "queued")
    by_token = {token: start for start, _end, token, _cwd in read_solver_log(log)}
    with psycopg.connect(url, autocommit=True) as conn:
        jobs = dict(conn.execute("SELECT id, source_path FROM inversions").fetchall())
    for job_id, path in jobs.items():
        token = f"d{int(Path(path).name.split('_')[1])}"
        if token in by_token and job_id in queued:
            latencies.append(by_token[token] - queued[job_id][-1])
    if len(latencies) != ctx.sizes.dispatch_n:
        raise RuntimeError(f"dispatch: {len(latencies)} of {ctx.sizes.dispatch_n} jobs ran")
    p50, p99 = bl.percentile(latencies, 50), bl.percentile(latencies, 99)
    ok = p50 <= 0.050 and p99 <= 0.200
    ctx.report.add(
        bl.Row(
            "dispatch latency: commit -> solver start",
            f"p50 {ms(p50)}, p99 {ms(p99)}",
            "—",
            "—",
            "p50 <= 50 ms, p99 <= 200 ms",
            None if ctx.smoke else ok,
            note=f"{len(latencies)} jobs, one idle worker, max {ms(max(latencies))}",
        )
    )
    ctx.cluster.drop_database(url)


def bench_overhead(ctx: Context) -> None:
    url = ctx.cluster.new_database()
    log = ctx.work / "overhead.log"
    db = ctx.database(url)
    n = ctx.sizes.overhead_n
    root = ctx.work / "overhead"
    for i in range(n):
        tiny_tomodir(root / f"td_{i:04d}", f"o{i}")
    add_service.add(db, [root], add_service.AddOptions())
    procs = start_workers(ctx, url, 1, quit_when_empty=True, log=log)
    wait_workers(procs, 600)
    claimed = event_times(url, "claimed")
    finished = event_times(url, "finished")
    runs = read_solver_log(log)
    solver_s = {job_of_cwd(cwd): end - start for start, end, _t, cwd in runs}
    order = sorted((times[0], job) for job, times in claimed.items())
    overheads = []
    for (t0, job), nxt in zip(order, order[1:] + [None]):
        t1 = nxt[0] if nxt is not None else finished[job][0]
        if job in solver_s:
            overheads.append(t1 - t0 - solver_s[job])
    if len(finished) != n or len(runs) != n:
        raise RuntimeError(f"overhead: {len(finished)} finished, {len(runs)} solver runs, expected {n}")
    p50 = bl.percentile(overheads, 50)
    solver_p50 = bl.percentile(list(solver_s.values()), 50)
    ctx.report.add(
        bl.Row(
            "worker overhead per job beyond the solver",
            f"p50 {ms(p50)}, p90 {ms(bl.percentile(overheads, 90))}",
            f"solver's own runtime p50 {ms(solver_p50)}",
            f"{p50 / solver_p50:.0f}x" if solver_p50 > 0 else "—",
            "p50 <= 20 ms",
            None if ctx.smoke else p50 <= 0.020,
            note=f"{n} tiny jobs back to back, one slot: claim to next claim minus solver time",
        )
    )
    ctx.cluster.drop_database(url)


def bench_herd(ctx: Context) -> None:
    """Idle workers woken per new job: NOTIFY should wake as many workers as there are jobs."""
    if not ctx.cluster.has_pg_stat_statements:
        ctx.report.add(bl.Row("claims per new job", "not measured", note="this PostgreSQL has no pg_stat_statements", target="report"))
        return
    url = ctx.cluster.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    log = ctx.work / "herd.log"
    db = ctx.database(url)
    n_workers, n = ctx.sizes.herd_workers, ctx.sizes.herd_n
    procs = start_workers(ctx, url, n_workers, quit_when_empty=False, log=log)
    try:
        idle_workers(url, n_workers)
        tds = [tiny_tomodir(ctx.work / "herd" / f"td_{i:04d}", f"h{i}") for i in range(n)]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        for td in tds:
            report = add_service.add(db, [td], add_service.AddOptions())
            job_id = report.added[0].job_id

            def done() -> bool:
                with psycopg.connect(url, autocommit=True) as conn:
                    return conn.execute("SELECT status FROM inversions WHERE id = %s", (job_id,)).fetchone()[0] in ("finished", "failed")

            wait_for(done, 30, 0.02)
            time.sleep(0.1)
        with psycopg.connect(url, autocommit=True) as conn:
            claims = conn.execute(
                # Each claim is a call of crh_claim (migration 0005): pg_stat_statements counts the
                # calls, not the statement inside the function.
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%crh_claim(%'"
            ).fetchone()[0]
    finally:
        stop_workers(procs)
    runs = len(read_solver_log(log))
    per_job = claims / n
    ctx.report.add(
        bl.Row(
            f"claims per new job, {n_workers} idle workers",
            f"{per_job:.2f} claims/job",
            "1 claim/job (ideal)",
            f"{per_job:.2f}x",
            "report",
            None if runs == n else False,
            note=f"{n} jobs added one at a time; {runs} solver runs",
        )
    )
    ctx.cluster.drop_database(url)


# --------------------------------------------------------------------------- throughput and claim


CLAIM_SQL_PARAMS = {"can_mod": True, "can_inv": True, "groups": [], "lease_s": 60.0}


class _Recorder:
    """Stands in for a connection to capture the statement and parameters jobs.claim sends."""

    def cursor(self, **_kw):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, query, params=None, **_kw):
        self.query, self.params = query, params
        return self

    def fetchone(self):
        return None


def claim_sql_for_pgbench(url: str, worker_id: int) -> str:
    """The exact statement jobs.claim sends, parameters bound client-side, for pgbench."""
    actor = jobs.Actor(worker_id=worker_id, host="pgbench", os_user="pgbench", pid=1)
    rec = _Recorder()
    jobs.claim(rec, actor=actor, **CLAIM_SQL_PARAMS)
    with psycopg.connect(url, autocommit=True) as conn:
        text = psycopg.ClientCursor(conn).mogrify(rec.query, rec.params)
    # One line for pgbench: the comments of jobs.sql would swallow the rest of it.
    text = re.sub(r"--[^\n]*", "", text)
    return " ".join(text.split()) + ";\n"


def pgbench_claim(ctx: Context, url: str, clients: int, seconds: int) -> float | None:
    pgbench = bl.pgbench_path()
    if pgbench is None:
        return None
    with psycopg.connect(url, autocommit=True) as conn:
        wid = workers.register_worker(conn, name="pgbench", host="pgbench", pid=1, version="bench", jobs=clients, threads=1, groups=(), solvers={})
    script = ctx.work / "claim.sql"
    script.write_text(claim_sql_for_pgbench(url, wid))
    proc = subprocess.run(
        [pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-f", str(script)],
        env=bl.pg_env(url),
        capture_output=True,
        text=True,
    )
    m = re.search(r"tps = ([\d.]+)", proc.stdout)
    if not m:
        raise RuntimeError(f"pgbench printed no tps:\n{proc.stdout}\n{proc.stderr}")
    return float(m.group(1))


def bench_throughput(ctx: Context) -> None:
    n = ctx.sizes.throughput_n
    url = ctx.cluster.new_database()
    log = ctx.work / "throughput.log"
    ids = queue_tiny_jobs(ctx, url, n, "tp")
    procs = start_workers(ctx, url, 4, quit_when_empty=True, log=log)
    wait_workers(procs, 900)
    claimed, finished = event_times(url, "claimed"), event_times(url, "finished")
    lost = [i for i in ids if i not in finished]
    dup = [i for i in ids if len(finished.get(i, [])) > 1]
    t0 = min(t for ts in claimed.values() for t in ts)
    t1 = max(t for ts in finished.values() for t in ts)
    jobs_s = len(finished) / (t1 - t0)
    # The reference: the claim statement alone, 4 clients, on a queue as deep as the run's.
    ref_url = ctx.cluster.new_database()
    queue_tiny_jobs(ctx, ref_url, max(n, 5000 * ctx.sizes.pgbench_s), "pgb")
    tps = pgbench_claim(ctx, ref_url, 4, ctx.sizes.pgbench_s)
    ctx.report.add(
        bl.Row(
            "throughput of tiny jobs, 4 workers",
            f"{jobs_s:.0f} jobs/s",
            f"pgbench claim stmt {tps:.0f} tps" if tps else "pgbench not installed",
            f"{jobs_s / tps:.3f}" if tps else "—",
            "report the ratio",
            False if (lost or dup) else None,
            note=f"{n} jobs, {len(lost)} lost, {len(dup)} duplicated",
        )
    )
    ctx.cluster.drop_database(url)
    ctx.cluster.drop_database(ref_url)


def claim_index_scans(conn) -> int:
    """How often ix_inversions_claim was scanned (this session's counts flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn.execute(
        "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'ix_inversions_claim'"
    ).fetchone()[0]


def bench_claim(ctx: Context) -> None:
    url = ctx.cluster.new_database()
    n_queue = ctx.sizes.claim_queue
    with psycopg.connect(url, autocommit=True) as conn:
        # A realistic mix: several users (fair rank), both job kinds, finished history.
        conn.execute(
            """
            INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file,
                                    fair_rank, datetime_queued)
            SELECT 'queued', CASE WHEN g %% 3 = 0 THEN 'mod' ELSE 'inv' END, 'user' || (g %% 7), 'h',
                   '/q/td_' || g, '/q/td_' || g || '.crh', g / 7 + 1, now()
            FROM generate_series(1, %(n)s) g
            """,
            {"n": n_queue},
        )
        # A finished job has a result (migration 0005): one stored archive stands for them all.
        conn.execute("INSERT INTO blobs (sha256, size, n_chunks, complete) VALUES (repeat('0', 64), 0, 0, true)")
        conn.execute(
            """
            INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file, datetime_finished,
                                    result_sha256, attempt, tries)
            SELECT 'finished', 'inv', 'old', 'h', '/f/td_' || g, '/f/td_' || g || '.crh', now(), repeat('0', 64), 1, 1
            FROM generate_series(1, %(n)s) g
            """,
            {"n": n_queue},
        )
        conn.execute("VACUUM ANALYZE inversions")
        wid = workers.register_worker(conn, name="bench", host="benchhost", pid=os.getpid(), version="bench", jobs=1, threads=1, groups=(), solvers={})
        actor = jobs.Actor(worker_id=wid)
        # The claim runs inside the database's function crh_claim (migration 0005), whose plan
        # EXPLAIN does not show: the index's own scan counter says whether the claims used it.
        scans_before = claim_index_scans(conn)
        times, floor = [], []
        for _ in range(ctx.sizes.claim_n):
            start = time.perf_counter()
            job = jobs.claim(conn, actor=actor, can_mod=True, can_inv=True, lease_s=60)
            times.append(time.perf_counter() - start)
            assert job is not None
            # The reference: the smallest durable write (one heartbeat), whose commit waits
            # for the same WAL flush; what the claim costs beyond it is the claim's own.
            start = time.perf_counter()
            conn.execute("UPDATE workers SET last_heartbeat = now() WHERE id = %s", (wid,))
            floor.append(time.perf_counter() - start)
        uses_index = claim_index_scans(conn) - scans_before >= len(times)
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%%crh_claim%%'").fetchone()[0]
    p50, p99 = bl.percentile(times, 50), bl.percentile(times, 99)
    f50, f99 = bl.percentile(floor, 50), bl.percentile(floor, 99)
    ctx.report.add(
        bl.Row(
            f"claim latency, {n_queue:,} queued jobs",
            f"p50 {ms(p50)}, p99 {ms(p99)}",
            f"1-row commit p50 {ms(f50)}, p99 {ms(f99)}",
            f"{p99 / f99:.1f}x",
            "p99 <= 10 ms",
            (p99 <= 0.010 and uses_index) if not ctx.smoke else (None if uses_index else False),
            note=f"{len(times)} claims in a row, commit each; plan uses ix_inversions_claim: {uses_index}; prepared: {bool(prepared)}",
        )
    )
    ctx.cluster.drop_database(url)


def bench_status(ctx: Context) -> None:
    """The admin-commands row: bench/status_100k.py measures it; this runs it on our cluster."""
    script = Path(__file__).resolve().parent / "status_100k.py"
    if not script.exists():
        ctx.report.add(bl.Row("crh_status --json at 100,000 jobs", "not measured", note="bench/status_100k.py does not exist", target="<= 1 s"))
        return
    url = ctx.cluster.new_database()
    args = [sys.executable, str(script), "--db", url] + (["--smoke"] if ctx.smoke else [])
    proc = subprocess.run(args, env=ctx.env(url), capture_output=True, text=True, timeout=1800)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    m = re.search(r"median ([\d.]+) ms, max ([\d.]+) ms", last)
    figure = f"median {m.group(1)} ms, max {m.group(2)} ms" if m else f"exit {proc.returncode}"
    verdict = proc.returncode == 0 and m is not None
    ctx.report.add(
        bl.Row(
            f"crh_status --json at {'2,000' if ctx.smoke else '100,000'} jobs",
            figure,
            "—",
            "—",
            "<= 1 s",
            verdict if not ctx.smoke else (None if verdict else False),
            note="bench/status_100k.py (admin commands), max decides" if m else (proc.stderr.strip()[-300:] or last),
        )
    )
    ctx.cluster.drop_database(url)


def bench_web(ctx: Context) -> None:
    """The rows of `crh web` (issue 18): bench/web_100k.py measures them; this runs it on our cluster."""
    script = Path(__file__).resolve().parent / "web_100k.py"
    size = "2,000" if ctx.smoke else "100,000"
    cells = "400" if ctx.smoke else "10,000"
    url = ctx.cluster.new_database()
    args = [sys.executable, str(script), "--db", url] + (["--smoke"] if ctx.smoke else [])
    proc = subprocess.run(args, env=ctx.env(url), capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    overview = re.search(r"web_overview_\S+: median ([\d.]+) ms, max ([\d.]+) ms server time .*raw SQL ([\d.]+) ms\): (\w+)", out)
    model = re.search(r"web_model_\S+: first ([\d.]+) ms, cached median ([\d.]+) ms .*static file ([\d.]+) ms\): (\w+)", out)
    problem = (proc.stderr.strip() or out.strip())[-300:]
    for found, name, figure, reference, target, ratio in (
        (overview, f"crh web overview at {size} jobs (server time)",
         lambda m: f"median {m[1]} ms, max {m[2]} ms", lambda m: f"raw SQL {m[3]} ms", "<= 300 ms",
         lambda m: f"{float(m[1]) / max(float(m[3]), 0.001):.2f}"),
        (model, f"crh web model picture, {cells} cells",
         lambda m: f"first {m[1]} ms, cached {m[2]} ms", lambda m: f"static file {m[3]} ms", "<= 1 s first, <= 20 ms cached",
         lambda m: "—"),
    ):
        if found is None or proc.returncode not in (0, 1):
            ctx.report.add(bl.Row(name, f"exit {proc.returncode}", target=target, ok=False, note=problem))
            continue
        passed = found[4] == "PASS"
        ok = passed if not ctx.smoke else (None if proc.returncode == 0 else False)
        ctx.report.add(bl.Row(name, figure(found), reference(found), ratio(found), target, ok, note="bench/web_100k.py"))
    ctx.cluster.drop_database(url)


# --------------------------------------------------------------------------- peak RSS


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 900) -> tuple[int, int]:
    """Run a command; return (its own peak RSS, the peak of its process tree's summed RSS), bytes,
    sampled every 10 ms from /proc.  The command's own figure is the kernel's high-water mark
    (VmHWM), which exec resets: the kernel's ru_maxrss would count the bench's own memory,
    which the child shared between fork and exec."""
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    own_peak = tree_peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        pids = [proc.pid]
        for p in pids:
            pids.extend(_children(p))
        own_peak = max(own_peak, _status_kb(proc.pid, "VmHWM:"))
        tree_peak = max(tree_peak, sum(_status_kb(p, "VmRSS:") for p in pids))
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args[0]} took longer than {timeout} s")
        time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
    return own_peak * 1024, tree_peak * 1024


def big_tomodir(path: Path, total: int) -> Path:
    """One tomodir of `total` bytes: a real small one plus large numeric-text files (sensitivities)."""
    tiny_tomodir(path, "rss", kind="inv")
    import random

    rng = random.Random(6)
    block = "".join(
        f"{rng.randint(1, 99999):8d}{rng.uniform(-1e3, 1e3):16.8E}{rng.gauss(0, 1):16.8E}\n" for _ in range(100_000)
    ).encode()
    n_files = max(1, total // (128 << 20))
    per_file = total // n_files
    for k in range(n_files):
        with open(path / "mod" / "sens" / f"sens{k:03d}.dat", "wb") as fh:
            left = per_file
            while left > 0:
                piece = block[k * 997 % 1000 :][: left]
                fh.write(piece)
                left -= len(piece)
    return path


def bench_rss(ctx: Context) -> None:
    url = ctx.cluster.new_database()
    root = ctx.work / "rss"
    td = big_tomodir(root / "big", ctx.sizes.rss_bytes)
    size = bl.tree_bytes(td)
    env = ctx.env(url, copy="../mod/sens/sens000.dat:../inv/sens_result.dat")
    limit = 150 * 2**20
    results = {}
    results["crh_add"] = peak_rss([crh("crh_add"), "-Q"], env, cwd=root)
    results["crh_worker"] = peak_rss([crh("crh_worker"), "-q", "-j", "1", "-Q"], env)
    results["crh_retrieve"] = peak_rss([crh("crh_retrieve"), "-Q"], env, cwd=root)
    if not (td / "inv" / "sens_result.dat").exists():
        raise RuntimeError("rss: the result did not come back")
    for name, (own, tree) in results.items():
        ctx.report.add(
            bl.Row(
                f"peak RSS of {name}, {bl.mb(size)} tomodir",
                f"{own / 2**20:.0f} MiB",
                "—",
                "—",
                "<= 150 MB",
                None if ctx.smoke else own <= limit,
                note=f"process tree sampled: {tree / 2**20:.0f} MiB",
            )
        )
    bl.rmtree(root)
    ctx.cluster.drop_database(url)


# --------------------------------------------------------------------------- many workers


def bench_many(ctx: Context) -> None:
    n_workers, n = ctx.sizes.many_workers, ctx.sizes.many_jobs
    url = ctx.cluster.new_database()
    log = ctx.work / "many.log"
    ids = queue_tiny_jobs(ctx, url, n, "many")
    procs = start_workers(ctx, url, n_workers, quit_when_empty=True, log=log)
    wait_workers(procs, 1800)
    claimed, finished = event_times(url, "claimed"), event_times(url, "finished")
    runs = read_solver_log(log)
    per_job_runs = Counter(job_of_cwd(cwd) for *_x, cwd in runs)
    lost = [i for i in ids if i not in finished]
    dup_finished = [i for i in ids if len(finished.get(i, [])) > 1]
    dup_runs = [i for i, c in per_job_runs.items() if c > 1]
    with psycopg.connect(url, autocommit=True) as conn:
        states = dict(conn.execute("SELECT status, count(*) FROM inversions GROUP BY status").fetchall())
    t0 = min(t for ts in claimed.values() for t in ts)
    t1 = max(t for ts in finished.values() for t in ts)
    ok = not lost and not dup_finished and not dup_runs and len(runs) == n and states.get("finished") == n
    ctx.report.add(
        bl.Row(
            f"{n_workers} worker processes x {n} tiny jobs",
            f"{len(finished) / (t1 - t0):.0f} jobs/s",
            "—",
            "—",
            "0 duplicates, 0 lost",
            ok,
            note=f"{len(lost)} lost, {len(dup_finished)} finished twice, {len(dup_runs)} run twice, {len(runs)} solver runs",
        )
    )
    ctx.cluster.drop_database(url)


# --------------------------------------------------------------------------- fleet


def bench_fleet(ctx: Context) -> None:
    """The fleet rows (issue 16): bench/fleet.py, on a cluster of their own."""
    import fleet

    fleet.bench_fleet(ctx)


# --------------------------------------------------------------------------- main


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; only correctness is enforced")
    parser.add_argument("--only", default="", help=f"comma-separated rows: {','.join(ROWS)}")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the add/retrieve measures (median)")
    parser.add_argument("--stores", default="db,dir", help="archive stores for add/retrieve: db,dir")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.reps:
        sizes.reps = args.reps
    rows = set(args.only.split(",")) if args.only else set(ROWS)
    unknown = rows - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    work = bl.scratch()
    started = time.monotonic()
    print(f"# cr_queue bench/run{' --smoke' if args.smoke else ''} on {machine()}; scratch {work}", flush=True)
    print(f"# {' '.join(sys.argv)}", flush=True)
    try:
        with bl.BenchCluster(work) as cluster:
            ctx = Context(args, sizes, work, cluster)
            ctx.build_solver()
            print(f"# tiny solver: {ctx.solver_kind}", flush=True)
            ctx.compile_bytecode()
            print(f"# commands run from bytecode compiled into {work / 'pycache'} (not from source on every start)", flush=True)
            for kind in args.stores.split(","):
                if rows & {"add", "retrieve"}:
                    bench_add_retrieve(ctx, kind, rows)
            steps = [
                ("dispatch", bench_dispatch),
                ("overhead", bench_overhead),
                ("herd", bench_herd),
                ("throughput", bench_throughput),
                ("claim", bench_claim),
                ("status", bench_status),
                ("web", bench_web),
                ("rss", bench_rss),
                ("many", bench_many),
                ("fleet", bench_fleet),
            ]
            for name, fn in steps:
                if name in rows:
                    # Like the add/retrieve rows: the earlier rows' dirty buffers and
                    # page cache written back, and a minute since the bench last
                    # deleted files (workers create files per job; see settle()).
                    cluster.checkpoint()
                    bl.settle(wait=not ctx.smoke)
                    fn(ctx)
    finally:
        if not args.keep:
            bl.rmtree(work)
    report = ctx.report
    print(f"# {len(report.rows)} measures in {time.monotonic() - started:.0f} s; {len(report.failed)} failed", flush=True)
    if args.markdown:
        args.markdown.write_text(report.markdown() + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
