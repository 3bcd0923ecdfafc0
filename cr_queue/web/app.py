"""The web application: routes, templates, and the guard every request passes.

Routes (all GET; HEAD is answered like GET):

    /                        the overview (live: its body is fetched again every few seconds)
    /part/overview           the overview's body alone, for that refresh
    /jobs                    the job list: ?state=&user=&group=&sipdir=&path=&before=
    /jobs/<id>               a job's page;  /jobs/<id>/part  its body alone (refreshed until it ends)
    /jobs/<id>/<kind>.png    its pictures: model, rms, volt, input-model
    /sipdir?path=&host=      a sipdir's frequencies side by side;  /sipdir.png?... on one colour scale
    /static/<file>           the style sheet and the script

The guard (:class:`Guard`) answers every other method with 405 before any
route is looked at, refuses a Host header that is not this machine's when
the server listens on loopback only (a web page elsewhere cannot read the
queue through the browser: DNS rebinding), sets headers that keep the
pages from being framed or running scripts from elsewhere, and reports the
time spent in the application (``Server-Timing: app;dur=MS``), which the
benchmark reads.

Links are relative to the page (``root`` in the templates), so the same
pages work at ``/`` and behind a reverse proxy at ``/crq/``.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import bottle
import jinja2
import psycopg

from cr_queue.config import redact
from cr_queue.db.connection import Database, DatabaseError
from cr_queue.store import StoreUnavailable
from cr_queue.web import pages, templating
from cr_queue.web.connections import Connections
from cr_queue.web.results import PICTURES, Results

log = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "HEAD")
LIVE_EVERY_S = 3.0
# The overview is computed at most this often, however many browsers poll it.
OVERVIEW_TTL_S = 1.0

SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
]

_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


@dataclass
class Site:
    """What every route shares: the database's connections, the results cache, the templates."""

    database: Database
    connections: Connections
    results: Results
    templates: jinja2.Environment
    live_every_s: float = LIVE_EVERY_S

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(live_every_s=self.live_every_s, **context)


class _Overview:
    """The overview, shared by all browsers for up to OVERVIEW_TTL_S (computed by one of them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = -1e9
        self._data: dict[str, Any] | None = None

    def get(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            if self._data is None or time.monotonic() - self._at > OVERVIEW_TTL_S:
                self._data = compute()
                self._at = time.monotonic()
            return self._data


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("cr_queue.web").joinpath("static")
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if suffix in _STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return files


def make_app(database: Database, *, loopback_only: bool = True, live_every_s: float = LIVE_EVERY_S, connections: int = 4) -> Guard:
    """The WSGI application for ``database`` (as :func:`open_database` resolved it)."""
    site = Site(
        database=database,
        connections=Connections(database, size=connections),
        results=Results(database),
        templates=templating.environment(),
        live_every_s=live_every_s,
    )
    site.templates.globals["database"] = f"{database.redacted} ({database.source})"
    bottle_app = bottle.Bottle()
    bottle_app.config["catchall"] = False  # errors reach the Guard, which answers them
    bottle_app.config["json.enable"] = False
    overview_cache = _Overview()
    static = _static_files()

    def page(render: Callable[[psycopg.Connection], str]) -> str:
        with site.connections.connection() as conn:
            return render(conn)

    def overview() -> dict[str, Any]:
        with site.connections.connection() as conn, site.connections.connection() as side:
            return pages.overview(conn, side)

    @bottle_app.get("/")
    def overview_page() -> str:
        return site.render("overview.html", root="", **overview_cache.get(overview))

    @bottle_app.get("/part/overview")
    def overview_part() -> str:
        return site.render("_overview.html", root="", **overview_cache.get(overview))

    @bottle_app.get("/jobs")
    def jobs_page() -> str:
        query = bottle.request.query
        try:
            filters = pages.Filters.of({k: query.getunicode(k) or "" for k in ("state", "user", "group", "sipdir", "path")})
            before = int(query.before) if query.before else None
        except ValueError as exc:
            raise _Problem(400, f"the job list cannot show that: {exc}") from None
        return page(lambda conn: site.render("jobs.html", root="", **pages.jobs(conn, filters, before=before)))

    @bottle_app.get("/jobs/<job_id:int>")
    def job_page(job_id: int) -> str:
        return page(lambda conn: site.render("job.html", root="../", **pages.job(conn, job_id, site.results)))

    @bottle_app.get("/jobs/<job_id:int>/part")
    def job_part(job_id: int) -> str:
        return page(lambda conn: site.render("_job.html", root="../", **pages.job(conn, job_id, site.results)))

    @bottle_app.get("/jobs/<job_id:int>/<kind>.png")
    def job_picture(job_id: int, kind: str) -> bytes:
        if kind not in PICTURES:
            raise _Problem(404, f"there is no picture {kind!r}; the pictures are {', '.join(PICTURES)}")
        with site.connections.connection() as conn:
            row = pages.job_archives(conn, job_id)
            png = site.results.picture(conn, row, kind)
        if png is None:
            raise _Problem(404, f"job {job_id} has no {kind} picture (not finished, or its files do not show one)")
        bottle.response.content_type = "image/png"
        # The pages ask for ?v=<the archive's sha256>: under that URL the picture never changes
        # (a job run again has another result, so another URL), and a browser may keep it.
        archive = row["input_sha256"] if kind == "input-model" else row["result_sha256"]
        immutable = bool(archive) and bottle.request.query.v == archive[:16]
        bottle.response.set_header("Cache-Control", "private, max-age=86400, immutable" if immutable else "private, no-cache")
        return png

    @bottle_app.get("/sipdir")
    def sipdir_page() -> str:
        path, host = bottle.request.query.getunicode("path"), bottle.request.query.getunicode("host")
        if not path or not host:
            raise _Problem(400, "a sipdir is named by ?path=SIPDIR&host=COMPUTER (the links on the overview carry both)")
        return page(lambda conn: site.render("sipdir.html", root="", **pages.sipdir(conn, path, host, site.results)))

    @bottle_app.get("/sipdir.png")
    def sipdir_picture() -> bytes:
        path, host = bottle.request.query.getunicode("path"), bottle.request.query.getunicode("host")
        if not path or not host:
            raise _Problem(400, "a sipdir is named by ?path=SIPDIR&host=COMPUTER")
        with site.connections.connection() as conn:
            png = pages.sipdir_picture(conn, path, host, site.results)
        if png is None:
            raise _Problem(404, f"no frequency of the sipdir {path} has a finished model yet")
        bottle.response.content_type = "image/png"
        return png

    @bottle_app.get("/static/<name>")
    def static_file(name: str) -> bytes:
        if name not in static:
            raise _Problem(404, f"no static file {name!r}")
        data, content_type = static[name]
        bottle.response.content_type = content_type
        bottle.response.set_header("Cache-Control", "private, max-age=300")
        return data

    @bottle_app.error(404)
    def not_found(error: bottle.HTTPError) -> str:
        return site.render("problem.html", root=_root(bottle.request.path), code=404,
                           message=f"there is no page {bottle.request.path}")

    return Guard(bottle_app, site, loopback_only=loopback_only)


def _root(path: str) -> str:
    """The relative way from a page at ``path`` back to the top (links work under any prefix)."""
    return "../" * max(path.count("/") - 1, 0)


class _Problem(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host of a Host header (``name``, ``name:port``, ``[v6]:port``) without the port."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The WSGI application as served: checks, headers and timing around the routes."""

    def __init__(self, app: bottle.Bottle, site: Site, *, loopback_only: bool) -> None:
        self.app = app
        self.site = site
        self.loopback_only = loopback_only

    def close(self) -> None:
        self.site.connections.close()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in ALLOWED_METHODS:
            return self._plain(start_response, started, "405 Method Not Allowed",
                               f"crh web only reads: {method} is refused (it answers GET and HEAD).",
                               [("Allow", ", ".join(ALLOWED_METHODS))])
        host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
        if self.loopback_only and not is_loopback(_host_of(host)):
            return self._plain(start_response, started, "403 Forbidden",
                               f"crh web listens on this machine only and answers requests for localhost, not for "
                               f"{host!r}. Open it as http://localhost:PORT/ (or through an SSH tunnel); behind a "
                               "reverse proxy, let the proxy send its own Host (nginx's default), see docs/deployment.md.")

        def timed_start(status: str, headers: list[tuple[str, str]], exc_info=None):
            headers = [h for h in headers if h[0].lower() != "server-timing"]
            headers += SECURITY_HEADERS + [("Server-Timing", f"app;dur={(time.perf_counter() - started) * 1000:.1f}")]
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, timed_start)
        except _Problem as problem:
            return self._page(environ, start_response, started, problem.status, str(problem))
        except pages.NotFound as exc:
            return self._page(environ, start_response, started, 404, str(exc))
        except (psycopg.OperationalError, DatabaseError, StoreUnavailable) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self._page(environ, start_response, started, 503,
                              f"cannot read the queue now ({redact(detail)}); this page tries again by itself")
        except Exception as exc:  # a bug: the page says so, the log has the traceback
            log.exception("crh web: %s %s failed", method, environ.get("PATH_INFO"))
            return self._page(environ, start_response, started, 500,
                              f"crh web failed on this page ({type(exc).__name__}: {exc}); its log has the details")

    def _plain(self, start_response: Callable, started: float, status: str, text: str, extra=()) -> list[bytes]:
        body = (text + "\n").encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *extra, *SECURITY_HEADERS,
                   ("Server-Timing", f"app;dur={(time.perf_counter() - started) * 1000:.1f}")]
        start_response(status, headers)
        return [body]

    def _page(self, environ: dict[str, Any], start_response: Callable, started: float, code: int, message: str) -> list[bytes]:
        root = _root(environ.get("PATH_INFO") or "/")
        body = self.site.render("problem.html", root=root, code=code, message=message).encode()
        headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))), *SECURITY_HEADERS,
                   ("Server-Timing", f"app;dur={(time.perf_counter() - started) * 1000:.1f}")]
        start_response(f"{code} {bottle.HTTP_CODES.get(code, 'Error')}", headers)
        return [body]
