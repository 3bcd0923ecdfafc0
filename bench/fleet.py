"""The fleet rows of bench/run (issue 16): what a large fleet of crh_worker processes costs.

    bench/run --only fleet            # 50, 100 and 200 workers; about 20 minutes on 2 cores
    bench/run --only fleet --smoke    # 5 workers, 50 jobs; under a minute

The rows run on bench/run's throwaway cluster (default durability, like the
other rows), restarted with max_connections = 2000 for them and back afterwards,
so that a fleet holding several connections per worker is measured, not
refused (every row says so).  They look at
the workers only from outside, so they measure whatever the worker is:

* connections: pg_stat_activity rows whose application_name starts with
  "crh_worker" (every worker connection names itself so);
* transactions: xact_commit + xact_rollback of the fleet's database in
  pg_stat_database (the bench's own sampling runs in another database).  A
  backend adds its counts when it flushes its statistics, which it may put off
  for up to a minute (clients in step, one query a second each, were counted
  a fifth of the time in a 20 s window): a window's figure is approximate,
  so statements/s from pg_stat_statements (counted as they end) stand beside
  it, and the reference closes its connections (which flushes them) before
  its count is read;
* server CPU: utime + stime from /proc of the postmaster and every live child
  (backends, checkpointer, walwriter, autovacuum...), plus the postmaster's
  cutime + cstime, which hold the time of the backends that exited meanwhile;
* liveness: workers.last_heartbeat, by worker name.

Rows:

1. Idle fleet at each size: connections per worker, transactions/s and server
   CPU seconds per minute over a measured window that starts once every worker
   has registered and beaten.  Reference in the same run: as many plain
   connections each sending one ``SELECT 1`` per second (the cheapest way a
   client can tell every second that it is alive), over a window of the same
   length, before any worker starts.  The ratio is the fleet's figure divided by
   the reference's: 1.0x means the fleet costs the server what one SELECT 1 per
   worker-second does.  Both include the idle server (the same window with no
   client at all, measured first and printed beside them; too small and noisy to
   subtract).  The workers' total RSS and PSS are reported too.
2. Tiny jobs at the largest size: every worker idle, then the jobs queued in one
   statement; throughput (first claim to last finish), lost and duplicated jobs
   from the events table and the solver's own log, claims per job.  Reference:
   one pgbench client running the worker's claim statement in a loop, on a queue
   as deep, in the same cluster.
3. Restart recovery at the largest size, last: ``pg_ctl restart -m fast`` with
   the fleet idle; the time from the server being up again until every worker
   has beaten after the restart (last_heartbeat >= pg_postmaster_start_time());
   peaks, sampled every 0.2 s, of the worker connections in pg_stat_activity
   and of the backend processes in /proc (known even while the server is too
   busy to let the monitor in), and what the server log says it refused.
4. A campaign of jobs whose solver runs a known time (tiny_solver.c sleeping
   as long as the tomodir's exe/bench_sleep says) on the fleet's first few
   workers, before it grows to the idle sizes: makespan from the queueing
   commit to the last finished event, against the ideal, the sum of the
   solver's own runtimes / slots.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

import benchlib as bl
import crqbench as cb

APP_PREFIX = "crh_worker"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class FleetSizes:
    levels: tuple[int, ...]  # idle fleet sizes, ascending; the largest also runs the restart and the tiny jobs
    slots: int  # crh_worker --jobs
    window_s: float  # each measured idle window
    tiny_jobs: int
    campaign_workers: int
    campaign_jobs: int
    campaign_job_s: float
    pgbench_s: int
    start_timeout_s: float
    recovery_timeout_s: float
    after_recovery_s: float  # connections still sampled after every worker has beaten again


FULL = FleetSizes((50, 100, 200), 4, 45.0, 5000, 10, 400, 1.0, 10, 900.0, 180.0, 10.0)
SMOKE = FleetSizes((5,), 4, 4.0, 50, 5, 40, 1.0, 1, 120.0, 60.0, 1.0)
# Room for several connections per worker at 200 workers (the worker of December 2026 held
# six with -j4: 1,200) and for a reconnection peak after a restart.
MAX_CONNECTIONS = 2000


_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line, a comment in the table's output."""
    print(f"# fleet +{time.monotonic() - _T0:.0f} s: {message}", flush=True)


# --------------------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, the state)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ticks(fields: list[str], children: bool = False) -> int:
    # utime, stime are fields 14, 15; cutime, cstime 16, 17.
    own = int(fields[11]) + int(fields[12])
    return own + (int(fields[13]) + int(fields[14]) if children else 0)


def postmaster_pid(cluster: bl.BenchCluster) -> int:
    return int((cluster.cluster.datadir / "postmaster.pid").read_text().split()[0])


def server_cpu_s(pm: int) -> float:
    """CPU seconds used so far by the server: the postmaster, its live children and (in
    the postmaster's cutime/cstime) the children it has reaped, e.g. exited backends."""
    fields = _stat(pm)
    if fields is None:
        raise RuntimeError(f"postmaster {pm} is gone")
    ticks = _ticks(fields, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None and f[1] == str(pm):
                ticks += _ticks(f)
    return ticks / CLK_TCK


def processes_cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes and of their children they waited for (solvers)."""
    return sum(_ticks(f, children=True) for f in map(_stat, pids) if f is not None) / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB; PSS counts each shared page once across processes."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


# --------------------------------------------------------------------------- the fleet


class Fleet:
    """crh_worker processes started by this bench, each with its log in ``logs``."""

    def __init__(self, ctx: cb.Context, url: str, slots: int, tag: str, *, solver_log: Path) -> None:
        self.url = url
        self.slots = slots
        self.tag = tag
        self.env = ctx.env(url, log=solver_log)
        self.logs = ctx.work / f"fleet-logs-{tag}"
        self.workdir = ctx.work / f"fleet-scratch-{tag}"
        self.logs.mkdir()
        self.workdir.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def names(self) -> list[str]:
        return list(self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def grow(self, n: int) -> None:
        """Start workers until n run."""
        args = [cb.crh("crh_worker"), "-j", str(self.slots), "-Q", "--log-level", "warning", "--workdir", str(self.workdir)]
        while len(self.procs) < n:
            name = f"{self.tag}-{len(self.procs):04d}"
            with open(self.logs / f"{name}.log", "wb") as log:
                self.procs[name] = subprocess.Popen(
                    args + ["--name", name], env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )

    def exited(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def log_tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-1500:]

    def wait_ready(self, timeout: float) -> float:
        """Wait until every worker has registered and beaten at least once since; returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                dead = self.exited()
                if dead:
                    raise RuntimeError(f"{len(dead)} crh_worker exited while starting; {dead[0]}: {self.log_tail(dead[0])}")
                ready = conn.execute(
                    "SELECT count(DISTINCT name) FROM workers WHERE name = ANY(%s) AND state = 'running' "
                    "AND last_heartbeat > datetime_started",
                    (self.names,),
                ).fetchone()[0]
                if ready >= len(self.procs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {ready} of {len(self.procs)} workers registered and beat within {timeout:.0f} s")
                time.sleep(0.5)
        waited = time.monotonic() - start
        time.sleep(1.0)  # the slots' first empty claims done, every thread waiting
        return waited

    def memory(self) -> tuple[int, int]:
        """Summed (RSS, PSS) of the workers in bytes."""
        rss = pss = 0
        for pid in self.pids:
            r, p = memory_kb(pid)
            rss, pss = rss + r, pss + p
        return rss * 1024, pss * 1024

    def stop(self, timeout: float = 120) -> None:
        self._stop(list(self.procs.values()), timeout)

    def _stop(self, procs: list[subprocess.Popen], timeout: float) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        bl.removed()


# --------------------------------------------------------------------------- measured windows


@dataclass
class Window:
    seconds: float
    xacts: int
    statements: int | None  # pg_stat_statements calls, None without it
    server_cpu: float
    workers_cpu: float
    worker_conns: list[int] = field(default_factory=list)
    client_conns: list[int] = field(default_factory=list)

    @property
    def tx_s(self) -> float:
        return self.xacts / self.seconds

    @property
    def stmt_s(self) -> float | None:
        return None if self.statements is None else self.statements / self.seconds

    @property
    def cpu_min(self) -> float:
        """Server CPU seconds per minute."""
        return self.server_cpu / self.seconds * 60

    @property
    def workers_cpu_min(self) -> float:
        return self.workers_cpu / self.seconds * 60


def activity(conn: psycopg.Connection) -> tuple[int, int]:
    """(crh_worker connections, all client connections but this one) in the cluster."""
    return conn.execute(
        "SELECT count(*) FILTER (WHERE application_name LIKE %s), "
        "count(*) FILTER (WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) FROM pg_stat_activity",
        (APP_PREFIX + "%",),
    ).fetchone()


def measure(
    cluster: bl.BenchCluster,
    dbname: str,
    seconds: float,
    *,
    tick=None,
    finish=None,
    worker_pids: list[int] | None = None,
) -> Window:
    """One window: transactions and statements of ``dbname``, server CPU, connections
    sampled every second.  ``tick(t)`` runs at the start of each second t (monotonic);
    ``finish()`` runs after the window's CPU is read and before its transactions are (the
    reference closes its connections there, which flushes their statistics).  The
    sampling connection is to the cluster's own database, so its queries are not
    counted in ``dbname``'s."""
    pm = postmaster_pid(cluster)
    pids = worker_pids or []
    with psycopg.connect(cluster.cluster.url, autocommit=True, application_name="bench monitor") as mon:

        def counts() -> tuple[int, int | None]:
            x = mon.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,)).fetchone()[0]
            if not cluster.has_pg_stat_statements:
                return x, None
            st = mon.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
                (dbname,),
            ).fetchone()[0]
            return x, int(st)

        x0, st0 = counts()
        c0, w0, t0 = server_cpu_s(pm), processes_cpu_s(pids), time.monotonic()
        workers_seen, clients_seen = [], []
        k = 0
        while True:
            if tick is not None:
                tick(t0 + k)
            w, c = activity(mon)
            workers_seen.append(w)
            clients_seen.append(c)
            k += 1
            if k >= seconds:
                break
            time.sleep(max(0.0, t0 + k - time.monotonic()))
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        c1, w1, t1 = server_cpu_s(pm), processes_cpu_s(pids), time.monotonic()
        if finish is not None:
            finish()
        x1, st1 = counts()
    return Window(
        t1 - t0, x1 - x0, None if st0 is None else st1 - st0, c1 - c0, w1 - w0, workers_seen, clients_seen
    )


def select1_reference(cluster: bl.BenchCluster, url: str, dbname: str, n: int, seconds: float) -> Window:
    """n plain connections to the fleet's database, each sending SELECT 1 once a second,
    spread over the second as independent clients would be.  Its transactions are exact:
    the connections are closed before the count is read, which flushes their statistics
    (a backend keeps them up to 60 s otherwise, and did, with clients in step)."""
    conns = [psycopg.connect(url, autocommit=True, application_name="bench select1") for _ in range(n)]

    def tick(start: float) -> None:
        for i, c in enumerate(conns):
            time.sleep(max(0.0, start + i / n - time.monotonic()))
            c.execute("SELECT 1")

    def close() -> None:
        for c in conns:
            c.close()
        time.sleep(1.0)

    try:
        return measure(cluster, dbname, seconds, tick=tick, finish=close)
    finally:
        for c in conns:
            c.close()


def dbname_of(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


# --------------------------------------------------------------------------- rows


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def idle_rows(ctx: cb.Context, fleet: Fleet, w: int, win: Window, ref: Window, base: Window, started_s: float) -> None:
    conns = sum(win.worker_conns) / len(win.worker_conns) / w
    label = f"idle fleet {w} x crh_worker -j{fleet.slots}"
    ctx.report.add(
        bl.Row(
            f"{label}: connections",
            f"{conns:.2f}/worker (max {max(win.worker_conns)})",
            "1/worker (DESIGN: idle worker)",
            f"{conns:.2f}x",
            "report",
            None,
            note=f"pg_stat_activity application_name {APP_PREFIX}*, sampled each second of {win.seconds:.0f} s; "
            f"cluster max_connections {MAX_CONNECTIONS} for this measure",
        )
    )
    def ratio(ours: float, ref: float) -> str:
        return f"{ours / ref:.1f}x" if ref > 0 else "n/a"

    ctx.report.add(
        bl.Row(
            f"{label}: server load",
            f"{win.tx_s:.1f} tx/s, {win.cpu_min:.2f} CPU-s/min",
            f"{w} conns x SELECT 1/s: {ref.tx_s:.1f} tx/s, {ref.cpu_min:.2f} CPU-s/min",
            f"tx {ratio(win.tx_s, ref.tx_s)}, CPU {ratio(win.cpu_min, ref.cpu_min)}",
            "report",
            None,
            note=f"statements/s (pg_stat_statements, counted at once): {fmt(win.stmt_s)} vs {fmt(ref.stmt_s)}; "
            f"pg_stat_database counts a backend's transactions when it flushes its statistics (up to 60 s late), so "
            f"the fleet's tx/s over {win.seconds:.0f} s is approximate, the reference's exact (its connections closed first); "
            f"ratio = fleet / reference, 1.0x = what one SELECT 1 per worker-second costs the server; both include the idle "
            f"server ({base.tx_s:.1f} tx/s, {base.cpu_min:.2f} CPU-s/min, same {base.seconds:.0f} s window, no clients); server CPU = postmaster + "
            f"all its processes from /proc; workers' own CPU {win.workers_cpu_min:.1f} s/min; the workers took {started_s:.0f} s "
            f"to start, register and beat; max_connections {MAX_CONNECTIONS}",
        )
    )
    rss, pss = fleet.memory()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ctx.report.add(
        bl.Row(
            f"{label}: memory",
            f"RSS {gib(rss)} ({rss / w / 2**20:.0f} MiB each)",
            f"machine {mem / 2**30:.0f} GiB",
            f"{rss / mem * 100:.1f}%",
            "report",
            None,
            note=f"summed from /proc/PID/smaps_rollup; PSS (shared pages counted once) {gib(pss)}, {pss / w / 2**20:.0f} MiB each",
        )
    )


AUX_TITLES = {
    "postgres: " + t
    for t in ("checkpointer", "background writer", "walwriter", "autovacuum launcher", "logical replication launcher",
              "logger", "archiver", "startup", "stats collector", "walreceiver")
}


def backend_processes(pm: int) -> int:
    """The postmaster's children that are not its own auxiliary processes: client backends,
    those still starting included.  Read from /proc, so it is known while the server is
    too busy to let a monitor in."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat(int(entry))
        if f is None or f[1] != str(pm):
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title not in AUX_TITLES and not title.startswith("postgres: autovacuum worker"):
            n += 1
    return n


def server_log_tail(cluster: bl.BenchCluster) -> tuple[Path | None, int]:
    """The server's current log file and its size: where a later read starts."""
    logs = sorted((cluster.cluster.datadir / "log").glob("postgresql-*.log"), key=lambda p: p.stat().st_mtime)
    return (logs[-1], logs[-1].stat().st_size) if logs else (None, 0)


def restart_recovery(ctx: cb.Context, cluster: bl.BenchCluster, fleet: Fleet, timeout: float, after: float) -> None:
    """pg_ctl restart -m fast with the fleet idle: until every worker has beaten again."""
    w = len(fleet.procs)
    log, offset = server_log_tail(cluster)
    t_down = time.monotonic()
    cluster.cluster.restart()
    t_up = time.monotonic()
    pm = postmaster_pid(cluster)
    peak_workers = peak_clients = peak_procs = 0
    all_beaten: float | None = None
    conn: psycopg.Connection | None = None
    samples = errors = 0
    deadline = t_up + timeout
    beaten = 0
    try:
        # Until every worker has beaten, and ``after`` s more: connections may still come and go.
        while time.monotonic() < deadline and (all_beaten is None or time.monotonic() < all_beaten + after):
            tick = time.monotonic()
            peak_procs = max(peak_procs, backend_processes(pm))
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(fleet.url, autocommit=True, connect_timeout=2, application_name="bench monitor")
                wk, cl = activity(conn)
                beaten = conn.execute(
                    "SELECT count(DISTINCT name) FROM workers WHERE name = ANY(%s) AND last_heartbeat >= pg_postmaster_start_time()",
                    (fleet.names,),
                ).fetchone()[0]
                samples += 1
                peak_workers, peak_clients = max(peak_workers, wk), max(peak_clients, cl)
                if beaten >= w and all_beaten is None:
                    all_beaten = time.monotonic()
            except psycopg.Error:
                errors += 1
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(max(0.0, tick + 0.2 - time.monotonic()))
        settled = activity(conn)[0] if conn is not None and not conn.closed else "?"
    finally:
        if conn is not None:
            conn.close()
    # What the server said meanwhile (its log: the connections it refused or lost).
    said = Counter()
    if log is not None and log.exists():
        with open(log, "rb") as fh:
            fh.seek(offset)
            for line in fh.read().decode(errors="replace").splitlines():
                for key, text in (("too many clients", "too many clients already"), ("client gone", "connection to client lost")):
                    if text in line:
                        said[key] += 1
    dead = fleet.exited()
    ok = all_beaten is not None and not dead
    if all_beaten is not None:
        figure = f"{all_beaten - t_up:.1f} s, peak {peak_workers} conns"
    else:
        figure = f"{beaten}/{w} beaten in {timeout:.0f} s, peak {peak_procs} backends"
    ctx.report.add(
        bl.Row(
            f"restart recovery, {w} idle crh_worker -j{fleet.slots}",
            figure,
            f"pg_ctl restart -m fast {t_up - t_down:.1f} s",
            "—",
            f"all beat again within {timeout:.0f} s",
            None if ok else False,
            note=f"server up -> every worker's last_heartbeat >= pg_postmaster_start_time(); peaks every 0.2 s: "
            f"{APP_PREFIX}* connections in pg_stat_activity {peak_workers} ({samples} samples, {errors} could not connect), "
            f"all clients {peak_clients}, backend processes in /proc {peak_procs}; {APP_PREFIX}* connections {after:g} s after: "
            f"{settled}; server log: {said['too many clients']} 'too many clients', {said['client gone']} 'connection to client "
            f"lost' (the client gave up while its backend started); {len(dead)} workers exited; max_connections {MAX_CONNECTIONS}",
        )
    )


def tiny_jobs(ctx: cb.Context, cluster: bl.BenchCluster, fleet: Fleet, n: int, solver_log: Path, pgbench_s: int) -> None:
    """The idle fleet takes n tiny jobs queued at once."""
    w = len(fleet.procs)
    stats = cluster.has_pg_stat_statements
    if stats:
        with psycopg.connect(fleet.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
    ids = cb.queue_tiny_jobs(ctx, fleet.url, n, f"{fleet.tag}-tiny")
    deadline = time.monotonic() + max(300.0, n * 0.2)
    with psycopg.connect(fleet.url, autocommit=True) as conn:
        while True:
            left = conn.execute("SELECT count(*) FROM inversions WHERE status IN ('queued', 'running')").fetchone()[0]
            if not left:
                break
            if time.monotonic() > deadline or len(fleet.exited()) == w:
                break
            time.sleep(0.5)
        calls = None
        if stats:
            calls = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%%crh_claim(%%' "
                "AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()[0]
        states = dict(conn.execute("SELECT status, count(*) FROM inversions WHERE id = ANY(%s) GROUP BY status", (ids,)).fetchall())
    # Only these jobs: the campaign ran on the same database and solver log before.
    wanted = set(ids)
    claimed = {k: v for k, v in cb.event_times(fleet.url, "claimed").items() if k in wanted}
    finished = {k: v for k, v in cb.event_times(fleet.url, "finished").items() if k in wanted}
    runs = [r for r in cb.read_solver_log(solver_log) if cb.job_of_cwd(r[3]) in wanted]
    per_job_runs = Counter(cb.job_of_cwd(cwd) for *_x, cwd in runs)
    lost = [i for i in ids if i not in finished]
    dup_finished = [i for i in ids if len(finished.get(i, [])) > 1]
    dup_runs = [i for i, c in per_job_runs.items() if c > 1]
    n_claimed = sum(len(v) for v in claimed.values())
    jobs_s = float("nan")
    if finished and claimed:
        t0 = min(t for ts in claimed.values() for t in ts)
        t1 = max(t for ts in finished.values() for t in ts)
        jobs_s = len(finished) / max(t1 - t0, 1e-6)
    ok = not lost and not dup_finished and not dup_runs and states.get("finished") == n
    # The reference: one client claiming in a loop with the worker's own statement, same cluster.
    ref_url = cluster.new_database()
    cb.queue_tiny_jobs(ctx, ref_url, max(n, 5000 * pgbench_s), f"{fleet.tag}-pgb")
    say(f"reference: pgbench -c 1 claim loop, {pgbench_s} s")
    tps = cb.pgbench_claim(ctx, ref_url, 1, pgbench_s)
    cluster.drop_database(ref_url)
    calls_note = f", {calls / n:.2f} claim calls/job incl. empty ones (pg_stat_statements)" if calls is not None else ""
    ctx.report.add(
        bl.Row(
            f"{w} crh_worker -j{fleet.slots} x {n} tiny jobs",
            f"{jobs_s:.0f} jobs/s",
            f"1 client claim loop {tps:.0f}/s" if tps else "pgbench not installed",
            f"{jobs_s / tps:.3f}x" if tps else "—",
            "0 lost, 0 duplicated",
            ok,
            note=f"{len(lost)} lost, {len(dup_finished)} finished twice, {len(dup_runs)} run twice, {len(runs)} solver runs; "
            f"{n_claimed / n:.2f} claimed events/job{calls_note}; first claim -> last finish; reference: pgbench -c 1 "
            f"of jobs.claim's statement on a queue as deep, the fleet idle meanwhile; max_connections {MAX_CONNECTIONS}",
        )
    )


def campaign(ctx: cb.Context, fleet: Fleet, s: FleetSizes, solver_log: Path) -> None:
    """n jobs of a known solver runtime on the fleet's W idle workers x J slots: makespan against the ideal."""
    n, url = s.campaign_jobs, fleet.url
    ids = cb.queue_tiny_jobs(ctx, url, n, f"{fleet.tag}-camp", sleep_s=s.campaign_job_s)
    deadline = time.monotonic() + 10 * n * s.campaign_job_s / (s.campaign_workers * s.slots) + 300
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM inversions WHERE id = ANY(%s) AND status IN ('queued', 'running')", (ids,)).fetchone()[0]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        queued_at = conn.execute(
            "SELECT extract(epoch FROM min(datetime_queued))::float8 FROM inversions WHERE id = ANY(%s)", (ids,)
        ).fetchone()[0]
    wanted = set(ids)
    finished = {k: v for k, v in cb.event_times(url, "finished").items() if k in wanted}
    runs = [r for r in cb.read_solver_log(solver_log) if cb.job_of_cwd(r[3]) in wanted]
    per_job_runs = Counter(cb.job_of_cwd(cwd) for *_x, cwd in runs)
    lost = [i for i in ids if i not in finished]
    dup = [i for i in ids if len(finished.get(i, [])) > 1] + [i for i, c in per_job_runs.items() if c > 1]
    slots = s.campaign_workers * s.slots
    ideal = sum(end - start for start, end, *_x in runs) / slots
    makespan = max(t for ts in finished.values() for t in ts) - queued_at if finished else float("nan")
    ctx.report.add(
        bl.Row(
            f"campaign: {n} jobs of {s.campaign_job_s:g} s on {s.campaign_workers} x crh_worker -j{s.slots}",
            f"makespan {makespan:.1f} s",
            f"ideal {ideal:.1f} s",
            f"{ideal / makespan * 100:.0f}%",
            "report efficiency",
            None if not lost and not dup else False,
            note=f"efficiency = ideal / makespan; ideal = sum of the solver's own runtimes ({len(runs)} runs) / {slots} slots; "
            f"makespan = the queueing commit -> the last finished event; {len(lost)} lost, {len(dup)} duplicated; "
            f"the workers idle beforehand (the first {s.campaign_workers} of the fleet below, before it grows)",
        )
    )


# --------------------------------------------------------------------------- the group


def bench_fleet(ctx: cb.Context) -> None:
    global _T0
    _T0 = time.monotonic()
    s = SMOKE if ctx.smoke else FULL
    cluster = ctx.cluster
    conf = cluster.cluster.extra_conf
    before = conf.get("max_connections")
    conf["max_connections"] = str(MAX_CONNECTIONS)
    cluster.cluster.restart()
    try:
        url = cluster.new_database()
        dbname = dbname_of(url)
        if cluster.has_pg_stat_statements:
            for u in (url, cluster.cluster.url):
                with psycopg.connect(u, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        solver_log = ctx.work / "fleet-tiny.log"
        fleet = Fleet(ctx, url, s.slots, "fleet", solver_log=solver_log)
        try:
            say(f"cluster up (max_connections {MAX_CONNECTIONS}); the idle server, {s.window_s:g} s")
            base = measure(cluster, dbname, s.window_s)
            refs = {}
            for w in s.levels:
                say(f"{w} connections x SELECT 1/s, {s.window_s:g} s")
                refs[w] = select1_reference(cluster, url, dbname, w, s.window_s)
            say(f"campaign on {s.campaign_workers} workers")
            fleet.grow(s.campaign_workers)
            fleet.wait_ready(s.start_timeout_s)
            campaign(ctx, fleet, s, solver_log)
            for w in s.levels:
                ref = refs[w]
                say(f"starting workers up to {w}")
                t = time.monotonic()
                fleet.grow(w)
                fleet.wait_ready(s.start_timeout_s)
                started = time.monotonic() - t
                say(f"{w} workers registered and beaten after {started:.0f} s; measuring {s.window_s:g} s")
                win = measure(cluster, dbname, s.window_s, worker_pids=fleet.pids)
                idle_rows(ctx, fleet, w, win, ref, base, started)
            say(f"{s.tiny_jobs} tiny jobs")
            tiny_jobs(ctx, cluster, fleet, s.tiny_jobs, solver_log, s.pgbench_s)
            time.sleep(2.0)
            say("pg_ctl restart -m fast")
            restart_recovery(ctx, cluster, fleet, s.recovery_timeout_s, s.after_recovery_s)
        finally:
            say("stopping the workers")
            fleet.stop()
        cluster.drop_database(url)
    finally:
        if before is None:
            conf.pop("max_connections", None)
        else:
            conf["max_connections"] = before
        cluster.cluster.restart()
    say("done")
