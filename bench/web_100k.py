#!/usr/bin/env python3
"""How fast `crh web` answers (issue 18): the overview at 100,000 jobs, a model picture of a 10,000-element mesh.

    python bench/web_100k.py                # own throwaway cluster, 100,000 jobs
    python bench/web_100k.py --db URL       # an existing, migrated, empty database
    python bench/web_100k.py --smoke        # 2,000 jobs, a small mesh: correctness only, never FAIL on time

It starts a throwaway PostgreSQL cluster (fsync off: this measures queries
and drawing, not disks), fills it as bench/status_100k.py does (100,000
jobs in varied states, workers, events), runs one real inversion of a
synthetic tomodir with 10,000 cells (crh_add, then crh_worker with the
stand-in CRTomo, in a group of its own so the fake queued jobs stay
untouched), starts the real `crh web --port 0` on it and asks it over HTTP.

Server time is what the application itself reports (the `Server-Timing:
app;dur=` header of every response): the time from the request reaching
the application to its answer, without the network and the client.

* the overview (`GET /`): measured with a pause longer than the web's
  one-second sharing of the overview between browsers before each
  request, so every answer is computed afresh.  Reference: the same
  queries in-process on a plain connection (status.snapshot and the web's
  own statements: the raw SQL a page cannot beat).  Target <= 300 ms.
* the job list (`GET /jobs`, with filters and a deep page): reported only.
* the model picture (`GET /jobs/ID/model.png`): the first request reads
  both archives from the database, parses elem.dat and the last rhoNN.mag
  and .pha, and draws; the next ones come from the cache.  Reference: a
  plain static file (`GET /static/app.css`), the floor of any answer.
  Targets: first <= 1000 ms, cached <= 20 ms.

Last lines:
`web_overview_100k: median X ms, max Y ms server time (target <= 300 ms): PASS|FAIL`
`web_model_10k: first X ms, cached median Y ms (targets <= 1000 ms, <= 20 ms): PASS|FAIL`;
the exit status is 1 on FAIL or on a wrong answer.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import psycopg  # noqa: E402

import benchlib  # noqa: E402

from cr_queue import status as status_service  # noqa: E402
from cr_queue.db import migrate  # noqa: E402
from cr_queue.db.embedded import Cluster  # noqa: E402
from cr_queue.queries import session  # noqa: E402
from cr_queue.queries import web as wq  # noqa: E402
from cr_queue.tomodir import synth  # noqa: E402
from status_100k import console_script, populate  # noqa: E402

OVERVIEW_TARGET_MS = 300.0
FIRST_TARGET_MS = 1000.0
CACHED_TARGET_MS = 20.0
GROUP = "webbench"
OVERVIEW_SHARED_S = 1.0  # app.OVERVIEW_TTL_S


def get(url: str) -> tuple[float, float, bytes, int]:
    """(server ms from Server-Timing, wall ms, body, status) of one GET."""
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        body = response.read()
        header = response.headers.get("Server-Timing", "")
        status = response.status
    wall = (time.perf_counter() - start) * 1000
    match = re.search(r"app;dur=([\d.]+)", header)
    if not match:
        raise RuntimeError(f"{url}: no Server-Timing header in the answer")
    return float(match.group(1)), wall, body, status


def in_process_overview(url: str) -> float:
    """The overview's queries alone, on a plain connection: ms."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        status_service.snapshot(conn, limit=10)
        with session.read_only_snapshot(conn):
            wq.by_state_and_group(conn)
            wq.hourly(conn)
            wq.running_per_node(conn)
            wq.running_by_worker(conn)
            wq.latest_jobs(conn, 15)
        return (time.perf_counter() - start) * 1000


def real_inversion(work: Path, env: dict[str, str], nx: int, nz: int) -> int:
    """Add one synthetic tomodir of nx x nz cells and run it with the stand-in CRTomo; its job id."""
    tree = work / "tree"
    synth.make_tomodir(tree / "big", "inv", nx=nx, nz=nz, n_electrodes=min(nx + 1, 48))
    subprocess.run([console_script("crh_add"), "--group", GROUP, str(tree)], env=env, check=True, capture_output=True, text=True, timeout=600)
    worker = subprocess.run(
        [console_script("crh_worker"), "-q", "--group", GROUP, "--json"], env=env, capture_output=True, text=True, timeout=900
    )
    if worker.returncode != 0:
        raise RuntimeError(f"crh_worker exited {worker.returncode}: {worker.stderr.strip()[-400:]}")
    with psycopg.connect(env["CRH_DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("SELECT id, status FROM inversions WHERE job_group = %s", (GROUP,)).fetchone()
    if row is None or row[1] != "finished":
        raise RuntimeError(f"the 10,000-cell inversion did not finish: {row}")
    return row[0]


def start_web(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([console_script("crh"), "web", "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()
    match = re.match(r"crh web: (http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"crh web did not start: {line!r}; {log.read_text()[-400:]}")
    return proc, match.group(1)


def main() -> int:
    args, n, runs = benchlib.size_options(__doc__.splitlines()[0], smoke="2,000 jobs, a 400-cell mesh, 2 runs: correctness only")
    nx, nz = (40, 10) if args.smoke else (200, 50)

    work = Path(tempfile.mkdtemp(prefix="crh-bench-web-"))
    cluster = None
    web = None
    url = args.db
    try:
        if url is None:
            cluster = Cluster(work / "data", extra_conf={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
            cluster.start()
            url = cluster.url
            migrate.upgrade(url)
        env = {k: v for k, v in os.environ.items() if k not in ("CRH_CONFIG", "CRH_STANDIN_FAIL", "CRH_STANDIN_SLEEP")}
        env.update(
            {
                "CRH_DATABASE_URL": url,
                "NO_COLOR": "1",
                "CRH_CRTOMO": console_script("crh_standin_crtomo"),
                "CRH_CRMOD": console_script("crh_standin_crmod"),
                "MPLCONFIGDIR": str(work / "matplotlib"),
            }
        )
        t0 = time.perf_counter()
        populate(url, n)
        print(f"inserted {n:,} jobs, 40 workers, {2 * n:,} events in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        job_id = real_inversion(work, env, nx, nz)
        print(f"one real inversion of {nx * nz:,} cells (stand-in CRTomo): job {job_id}, {time.perf_counter() - t0:.1f} s", flush=True)

        in_process = [in_process_overview(url) for _ in range(runs)]
        web, base = start_web(env, work / "web.log")
        wrong: list[str] = []

        # The overview, computed afresh each time.
        get(base)  # warm-up: the first connection, the templates
        overview = []
        for _ in range(runs):
            time.sleep(OVERVIEW_SHARED_S + 0.2)
            server_ms, _wall, body, code = get(base)
            overview.append(server_ms)
            if code != 200 or f'data-job-id="{job_id}"'.encode() not in body:
                wrong.append(f"the overview does not name job {job_id}")
        if f"{n + 1:,}".encode() not in body:
            wrong.append(f"the overview does not count {n + 1:,} jobs")

        # The job list (reported, no target): the first page, a rare state, a path filter, a deep page.
        listing = {}
        for label, query in (("first page", ""), ("state=running", "?state=running"), ("path filter", "?path=project7%2Ftd77"),
                             ("page after job 1,000", "?before=1000")):
            server_ms, _wall, body, code = get(f"{base}jobs{query}")
            listing[label] = server_ms
            if code != 200 or b'id="job-list"' not in body:
                wrong.append(f"the job list ({label}) did not answer")

        # A model picture: first drawn, then cached.
        first, _wall, png, code = get(f"{base}jobs/{job_id}/model.png")
        if code != 200 or not png.startswith(b"\x89PNG"):
            wrong.append("the model picture is not a PNG")
        cached = [get(f"{base}jobs/{job_id}/model.png")[0] for _ in range(max(runs, 5))]
        static = [get(f"{base}static/app.css")[0] for _ in range(max(runs, 5))]

        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} CPUs, load average {load} (other work on the machine inflates every figure)")
        print(f"overview queries alone (in-process, raw SQL): median {statistics.median(in_process):.0f} ms, max {max(in_process):.0f} ms")
        print(f"overview server time (ms): {', '.join(f'{t:.0f}' for t in overview)}")
        print(f"static file server time: median {statistics.median(static):.3f} ms")
        print("job list server time: " + ", ".join(f"{label} {ms:.0f} ms" for label, ms in listing.items()))
        print(f"model picture of {nx * nz:,} cells: first {first:.0f} ms ({len(png):,} bytes PNG); cached (ms): {', '.join(f'{t:.2f}' for t in cached)}")
        if wrong:
            print("wrong answers: " + "; ".join(sorted(set(wrong))))
            return 1
        med, worst = statistics.median(overview), max(overview)
        ok_overview = med <= OVERVIEW_TARGET_MS
        cached_med = statistics.median(cached)
        ok_model = first <= FIRST_TARGET_MS and cached_med <= CACHED_TARGET_MS
        verdict = {True: "PASS", False: "INFO" if args.smoke else "FAIL"}
        size = f"{n // 1000}k"
        print(f"web_overview_{size}: median {med:.0f} ms, max {worst:.0f} ms server time "
              f"(target <= {OVERVIEW_TARGET_MS:.0f} ms; raw SQL {statistics.median(in_process):.0f} ms): {verdict[ok_overview]}")
        print(f"web_model_{nx * nz}_cells: first {first:.0f} ms, cached median {cached_med:.2f} ms "
              f"(targets <= {FIRST_TARGET_MS:.0f} ms, <= {CACHED_TARGET_MS:.0f} ms; static file {statistics.median(static):.3f} ms): "
              f"{verdict[ok_model]}")
        return 0 if (ok_overview and ok_model) or args.smoke else 1
    finally:
        if web is not None:
            web.terminate()
            try:
                web.wait(timeout=30)
            except subprocess.TimeoutExpired:
                web.kill()
                web.wait()
        if cluster is not None:
            cluster.stop(mode="immediate")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
