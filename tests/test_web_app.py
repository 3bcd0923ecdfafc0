"""`crh web` over HTTP, as a real process on the test cluster (tests/web_world.py):
read-only in every route and in its database session, row-level security
through the caller's login, the job list's filters and paging, pictures
cached by sha256, and the acceptance line: `crh web` on the embedded
default after `crh demo --keep` shows the demo's jobs.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from urllib.parse import urlencode

import psycopg
import pytest
from psycopg import conninfo, errors

from cr_queue import config
from cr_queue.database import open_database
from cr_queue.db import connection
from cr_queue.web import app as web_app
from cr_queue.web import pages
from cr_queue.web.connections import Connections, read_only_url

from .conftest import run, script
from .test_demo_local import embedded_env  # noqa: F401  (fixture)
from .web_world import ALICE, World, world  # noqa: F401  (fixture)

WRITES = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND")


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"x=1" if method in ("POST", "PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def job_ids(html: bytes) -> set[int]:
    """Every job a page names (each reference carries data-job-id)."""
    return {int(m) for m in re.findall(rb'data-job-id="(\d+)"', html)}


def _database(world: World) -> connection.Database:
    """The world's database as every command opens it (the owner's login)."""
    return open_database(config.Settings(world.db_url, "test", None, None, None))


def routes(world: World) -> list[str]:
    good = world.alice["good"]
    return [
        "",
        "part/overview",
        "jobs",
        "jobs?" + urlencode({"state": "failed"}),
        f"jobs/{good}",
        f"jobs/{good}/part",
        f"jobs/{good}/model.png",
        f"jobs/{good}/rms.png",
        f"jobs/{world.alice['model']}/volt.png",
        f"jobs/{world.alice['model']}/input-model.png",
        "sipdir?" + urlencode({"path": world.sipdir, "host": world.host}),
        "sipdir.png?" + urlencode({"path": world.sipdir, "host": world.host}),
        "static/app.css",
        "static/live.js",
        "no/such/page",
    ]


def test_every_route_only_reads(world):
    world.run_worker()
    web = world.web(ALICE)
    for route in routes(world):
        code, headers, body = fetch(web.url + route)
        assert code == (404 if route.startswith("no/") else 200), (route, code, body[:300])
        assert "app;dur=" in headers["Server-Timing"] and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        code, headers, body = fetch(web.url + route, method="HEAD")
        assert body == b"" and code in (200, 404), route
        for method in WRITES:
            code, headers, body = fetch(web.url + route, method=method)
            assert code == 405, (method, route, code)
            assert headers["Allow"] == "GET, HEAD" and b"only reads" in body


def test_the_database_session_is_read_only(world):
    connections = Connections(_database(world))
    with connections.connection() as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE inversions SET priority = priority + 1")
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM events")
    # The failed statements left the connection usable, and the pool kept it.
    with connections.connection() as conn:
        assert conn.execute("SELECT count(*) FROM inversions").fetchone()[0] == len(world.alice) + len(world.bob)
    connections.close()
    web = world.web(ALICE)
    assert b"read-only session" in fetch(web.url)[2]


def test_the_read_only_options_keep_those_of_the_url():
    url = read_only_url("postgresql://alice@db.example.org/crqueue?options=-c%20search_path%3Dcrq&sslmode=require", 5000)
    params = conninfo.conninfo_to_dict(url)
    assert params["options"] == "-c search_path=crq -c default_transaction_read_only=on -c statement_timeout=5000"
    assert params["user"] == "alice" and params["sslmode"] == "require" and params["host"] == "db.example.org"


def test_a_scientist_sees_her_jobs_and_the_queue_as_totals(world):
    world.run_worker()
    web = world.web(ALICE)
    assert "login web_alice: its own jobs and the queue's totals" in web.banner
    alice, bob = set(world.alice.values()), set(world.bob.values())
    seen: set[int] = set()
    for route in routes(world):
        if not route.endswith((".png", ".css", ".js")):
            seen |= job_ids(fetch(web.url + route)[2])
    seen |= job_ids(fetch(web.url + "jobs?" + urlencode({"path": "secret"}))[2])
    assert alice <= seen and not (seen & bob)
    overview = fetch(web.url)[2].decode()
    assert "The whole queue:" in overview and f"({len(alice) + len(bob)} jobs of all users)" in overview
    (bob_job,) = bob
    for route in (f"jobs/{bob_job}", f"jobs/{bob_job}/part", f"jobs/{bob_job}/model.png", f"jobs/{bob_job}/rms.png"):
        code, _, body = fetch(web.url + route)
        assert code == 404 and b"secret" not in body, route
    assert b"may see" in fetch(web.url + f"jobs/{bob_job}")[2]


def test_the_owner_sees_every_job(world):
    world.run_worker()
    web = world.web(None)
    assert ": every job; read-only" in web.banner
    seen = job_ids(fetch(web.url + "jobs")[2])
    assert set(world.alice.values()) | set(world.bob.values()) <= seen
    code, headers, _ = fetch(web.url + f"jobs/{world.bob['secret']}/model.png")
    assert code == 200 and headers["Cache-Control"] == "private, no-cache"
    with psycopg.connect(world.db_url) as conn:
        sha = conn.execute("SELECT result_sha256 FROM inversions WHERE id = %s", (world.bob["secret"],)).fetchone()[0]
    code, headers, _ = fetch(web.url + f"jobs/{world.bob['secret']}/model.png?v={sha[:16]}")
    assert code == 200 and "immutable" in headers["Cache-Control"]
    assert f"model.png?v={sha[:16]}" in fetch(web.url + f"jobs/{world.bob['secret']}")[2].decode()


def test_requests_for_other_hosts_are_refused_on_loopback(world):
    web = world.web(ALICE)
    port = web.url.rsplit(":", 1)[1].strip("/")
    assert fetch(web.url, headers={"Host": f"localhost:{port}"})[0] == 200
    assert fetch(web.url, headers={"Host": f"[::1]:{port}"})[0] == 200
    code, _, body = fetch(web.url, headers={"Host": "rebound.example.org"})
    assert code == 403 and b"localhost" in body


def test_job_pages_show_what_the_job_computed(world):
    world.run_worker()
    web = world.web(ALICE)
    good = fetch(web.url + f"jobs/{world.alice['good']}")[2].decode()
    assert 'id="model-picture"' in good and 'id="rms-chart"' in good and "the inversion finished" in good
    assert "inv/rho03.mag and inv/rho03.pha" in good and "crh_standin_crtomo" in good
    bad = fetch(web.url + f"jobs/{world.alice['bad']}")[2].decode()
    assert "error_dat" in bad and "exe/error.dat" in bad and "failure injected by the cr_queue stand-in" in bad
    assert 'id="log-tail"' in bad and "CRTomo stand-in" in bad
    model = fetch(web.url + f"jobs/{world.alice['model']}")[2].decode()
    assert 'id="volt-plot"' in model and 'id="input-model-picture"' in model and "measurements" in model
    sip = fetch(web.url + "sipdir?" + urlencode({"path": world.sipdir, "host": world.host}))[2].decode()
    frequencies = re.findall(r'data-frequency="([^"]*)"', sip)
    assert frequencies == ["0.1", "1.0", "10.0"] and sip.count('class="model thumb"') == 3
    assert 'id="frequencies-picture"' in sip


def test_pictures_are_drawn_once_per_result(world):
    """In-process: the second request for a picture comes from the cache (by the result's sha256)."""
    world.run_worker()
    app = web_app.make_app(_database(world))
    try:
        results = app.site.results

        def get(path: str) -> tuple[str, bytes]:
            answer: dict[str, str] = {}
            body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_HOST": "localhost", "wsgi.input": None,
                                 "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http"},
                                lambda status, headers, exc_info=None: answer.update(status=status)))
            return answer["status"], body

        status, first = get(f"/jobs/{world.alice['good']}/model.png")
        made = results.pictures.made
        status2, second = get(f"/jobs/{world.alice['good']}/model.png")
        assert status == status2 == "200 OK" and first == second and first.startswith(b"\x89PNG")
        assert results.pictures.made == made
        get(f"/jobs/{world.alice['good']}/rms.png")
        assert results.pictures.made == made + 1
    finally:
        app.close()


def test_the_job_list_filters_and_pages(world):
    world.run_worker()
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        everything = pages.jobs(conn, pages.Filters())
        assert everything["total"] == len(world.alice) + len(world.bob)
        ids = [j["id"] for j in everything["jobs"]]
        assert ids == sorted(ids, reverse=True)
        first = pages.jobs(conn, pages.Filters(), limit=3)
        assert [j["id"] for j in first["jobs"]] == ids[:3] and first["next_before"] == ids[2]
        second = pages.jobs(conn, pages.Filters(), before=first["next_before"], limit=3)
        assert [j["id"] for j in second["jobs"]] == ids[3:6]
        failed = pages.jobs(conn, pages.Filters.of({"state": "failed"}))
        assert [j["id"] for j in failed["jobs"]] == [world.alice["bad"]]
        sip = pages.jobs(conn, pages.Filters.of({"sipdir": world.sipdir}))
        assert sip["total"] == 3
        path = pages.jobs(conn, pages.Filters.of({"path": "survey/go"}))
        assert [j["id"] for j in path["jobs"]] == [world.alice["good"]]
        assert pages.jobs(conn, pages.Filters.of({"user": "nobody"}))["total"] == 0
    with pytest.raises(ValueError, match="state 'done' is not one of"):
        pages.Filters.of({"state": "done"})
    web = world.web(ALICE)
    code, _, body = fetch(web.url + "jobs?state=done")
    assert code == 400 and b"is not one of" in body


def test_the_overview_counts_the_day(world):
    world.run_worker()
    with psycopg.connect(world.db_url, autocommit=True) as conn, psycopg.connect(world.db_url, autocommit=True) as side:
        view = pages.overview(conn, side)
    assert view["privileged"] and view["read_only"] is False  # a plain connection, not the web's
    chart = view["chart"]
    assert len(chart["bars"]) == 24
    assert chart["finished"] == len(world.alice) + len(world.bob) - 1 and chart["failed"] == 1
    assert {g["group"]: g["total"] for g in view["by_group"]} == {None: len(world.alice) + len(world.bob)}
    assert {j["id"] for j in view["latest"]} == set(world.alice.values()) | set(world.bob.values())


def test_the_web_rides_out_a_missing_database_and_says_so(world, tmp_path):
    """A database that cannot be reached: the command stops with exit 2 and the reason."""
    env = {**world.env, "CRH_DATABASE_URL": "postgresql://nobody@/crqueue?host=" + str(tmp_path)}
    proc = run([script("crh"), "web", "--port", "0"], env, check=2, timeout=60)
    assert "cannot connect to the database" in proc.stderr and "Traceback" not in proc.stderr


def test_crh_web_after_crh_demo_keep_shows_the_demo(embedded_env, tmp_path):  # noqa: F811
    """Acceptance: on the embedded default, after `crh demo --keep`, `crh web` shows the demo's jobs."""
    env = {k: v for k, v in embedded_env.items() if k not in ("CRH_CRMOD", "CRH_CRTOMO")}
    env["MPLCONFIGDIR"] = str(tmp_path / "matplotlib")
    demo = run([script("crh"), "demo", "--keep"], env, timeout=300)
    root = re.search(r"demo tree with 6 synthetic tomodirs in (\S+)", demo.stdout).group(1)
    added = dict(re.findall(r"added job (\d+) \(([a-z+]+)\)", demo.stdout))
    assert len(added) == 6
    from .web_world import Web

    web = Web(env, tmp_path / "web.log")
    try:
        assert "(embedded)" in web.banner
        overview = fetch(web.url)[2].decode()
        assert {str(i) for i in job_ids(overview.encode())} >= set(added)
        assert root in overview
        inversion = next(i for i, steps in added.items() if steps == "inv")
        page = fetch(web.url + f"jobs/{inversion}")[2].decode()
        assert 'id="model-picture"' in page and 'id="rms-chart"' in page
        code, headers, png = fetch(web.url + f"jobs/{inversion}/model.png")
        assert code == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
    finally:
        web.stop()
