#!/usr/bin/env python3
"""Soak run (issue 3): many tiny jobs, workers killed with SIGKILL, one database restart.

    python bench/soak.py [--jobs 500] [--workers 4] [--kill-every 3-6] [--limit 1200]

Starts its own throwaway PostgreSQL (cr_queue.embedded.Cluster in a temp
dir), registers JOBS stand-in tomodirs with crh_add, runs WORKERS crh_worker
processes, kills a random one with SIGKILL every few seconds and starts a
new one in its place, and restarts the database with pg_ctl once, when about
half the jobs are done.  When every job has ended it stops the workers and
checks, from the events table:

* every job finished, and exactly once (one 'finished' event per job);
* none lost (none left queued, running or failed);
* no stale result accepted (each finished event names the job's last attempt);
* no job directory left in the workers' --workdir.

The last line is the verdict, e.g.
``soak: 500/500 finished exactly once, 0 lost, 0 duplicates, 23 kills, 1 database restart: PASS``;
the exit status is 0 only on PASS.  Not part of CI (it runs for minutes).

Jobs are added with --max-attempts 20: this run kills workers far more often
than any cluster does, and a job whose worker is killed max_attempts times is
*failed* by design (lost_worker), which would be counted as lost here.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import benchlib  # noqa: E402
from cr_queue.db import migrate
from cr_queue.tomodir import synth  # noqa: E402


def script(name: str) -> str:
    return benchlib.console_script(name, "soak")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Soak(benchlib.WorkerHome):
    def __init__(self, home: Path, args: argparse.Namespace) -> None:
        super().__init__(home)
        self.args = args
        self.rng = random.Random(args.seed)
        self.workers: list[subprocess.Popen] = []
        self.started = 0
        self.kills = 0
        self.killed_pids: set[int] = set()
        self.restarts = 0
        self.leaked: list[str] = []

    def env(self) -> dict[str, str]:
        return benchlib.standin_env(self.home, self.url, "soak")

    # ------------------------------------------------------------------ steps

    def setup(self) -> None:
        self.cluster.start()
        migrate.upgrade(self.url)
        for i in range(self.args.jobs):
            td = synth.make_tomodir(self.tree / f"site_{i // 50:02d}" / f"td_{i:04d}", "mod", nx=4, nz=2, seed=i)
            (td / "exe" / "standin.cfg").write_text(f"sleep = {self.rng.uniform(0.2, 1.5):.2f}\n")
        t0 = time.monotonic()
        subprocess.run(
            [script("crh_add"), "--quiet", "--max-attempts", "20", str(self.tree)],
            env=self.env(),
            check=True,
        )
        say(f"{self.args.jobs} jobs added in {time.monotonic() - t0:.1f} s")

    def start_worker(self) -> subprocess.Popen:
        self.started += 1
        name = f"soak{self.started}"
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [script("crh_worker"), "--name", name, "--jobs", str(self.args.slots), "--workdir", str(self.workdir),
             "--log-level", "warning"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return proc

    def counts(self) -> dict[str, int]:
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                return dict(conn.execute("SELECT status, count(*) FROM inversions GROUP BY 1").fetchall())
        except psycopg.OperationalError:
            return {}

    def run(self) -> None:
        self.workers = [self.start_worker() for _ in range(self.args.workers)]
        lo, hi = self.args.kill_every
        next_kill = time.monotonic() + self.rng.uniform(lo, hi)
        next_report = 0.0
        deadline = time.monotonic() + self.args.limit
        while True:
            counts = self.counts()
            ended = sum(counts.get(s, 0) for s in ("finished", "failed", "cancelled"))
            if counts and ended >= self.args.jobs:
                break
            now = time.monotonic()
            if now > deadline:
                say(f"time limit of {self.args.limit} s reached with {counts}")
                break
            if now >= next_report:
                say(f"{counts.get('finished', 0)} finished, {counts.get('running', 0)} running, "
                    f"{counts.get('queued', 0)} queued; {self.kills} kills")
                next_report = now + 10
            if not self.restarts and counts.get("finished", 0) >= self.args.jobs // 2:
                say("restarting the database (pg_ctl restart)")
                self.cluster.restart()
                self.restarts += 1
            if now >= next_kill:
                victim = self.rng.randrange(len(self.workers))
                proc = self.workers[victim]
                proc.kill()
                proc.wait()
                self.kills += 1
                self.killed_pids.add(proc.pid)
                self.workers[victim] = self.start_worker()
                next_kill = now + self.rng.uniform(lo, hi)
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    say(f"worker pid {proc.pid} exited by itself with status {proc.returncode}; starting another")
                    self.workers[i] = self.start_worker()
            time.sleep(0.2)

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.workdir.iterdir())

    def leaked_by_stopped_workers(self) -> list[str]:
        """Job directories of workers that were stopped, not killed: those must never remain."""
        return [n for n in self.leftovers() if int(n[len("crh-w"):].split("-", 1)[0]) not in self.killed_pids]

    def verdict(self) -> bool:
        with psycopg.connect(self.url, autocommit=True) as conn:
            jobs = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, attempt FROM inversions")}
            finished = conn.execute(
                "SELECT job_id, count(*), max(attempt) FROM events WHERE event = 'finished' GROUP BY 1"
            ).fetchall()
            rescued = conn.execute("SELECT count(*) FROM events WHERE event = 'rescued'").fetchone()[0]
            runs = conn.execute("SELECT count(*) FROM events WHERE event = 'claimed'").fetchone()[0]
        once = {job_id for job_id, n, _ in finished if n == 1}
        duplicates = sum(1 for _, n, _ in finished if n > 1)
        stale = sum(1 for job_id, _, attempt in finished if jobs[job_id][1] != attempt)
        done = sum(1 for job_id, (status, _) in jobs.items() if status == "finished" and job_id in once)
        lost = sum(1 for status, _ in jobs.values() if status != "finished")
        leftovers = self.leftovers()
        total = self.args.jobs
        say(f"{runs} claims for {len(jobs)} jobs, {rescued} rescued after a kill, {stale} stale results accepted, "
            f"{len(leftovers)} job directories left in --workdir")
        ok = (len(jobs) == total and done == total and lost == 0 and duplicates == 0 and stale == 0
              and not leftovers and not self.leaked and self.restarts == 1)
        print(
            f"soak: {done}/{total} finished exactly once, {lost} lost, {duplicates} duplicates, "
            f"{self.kills} kills, {self.restarts} database restart{'s' if self.restarts != 1 else ''}: "
            f"{'PASS' if ok else 'FAIL'}",
            flush=True,
        )
        return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2, help="--jobs of each worker")
    parser.add_argument("--kill-every", type=lambda t: tuple(float(x) for x in t.split("-")), default=(3.0, 6.0),
                        metavar="LO-HI", help="seconds between kills, drawn uniformly (default 3-6)")
    parser.add_argument("--limit", type=float, default=1200, help="give up after this many seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="crq-soak-"))
    soak = Soak(home, args)
    ok = False
    try:
        soak.setup()
        started = time.monotonic()
        soak.run()
        soak.stop_workers()
        say(f"all jobs ended after {time.monotonic() - started:.0f} s")
        soak.leaked = soak.leaked_by_stopped_workers()
        if soak.leaked:
            say(f"stopped workers left job directories behind: {soak.leaked}")
        # Workers killed last leave their job directories until the next worker
        # on the node starts and removes them, as a restarted service would.
        subprocess.run([script("crh_worker"), "-q", "--workdir", str(soak.workdir), "--log-level", "error"],
                       env=soak.env(), stdout=subprocess.DEVNULL, check=False)
        ok = soak.verdict()
    finally:
        for proc in soak.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        soak.cluster.stop(mode="immediate")
        if args.keep or not ok:
            print(f"soak: logs kept in {home}", flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
