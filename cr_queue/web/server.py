"""Serving the web application with waitress until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cr_queue.db.connection import Database
from cr_queue.queries import web as wq
from cr_queue.web import pictures
from cr_queue.web.app import Guard, is_loopback, make_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321
THREADS = 4


class WebError(Exception):
    """The server cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class Serving:
    url: str
    login: str
    privileged: bool
    loopback_only: bool


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(
    database: Database,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int = THREADS,
    on_ready: Callable[[Serving], None] = lambda serving: None,
) -> None:
    """Serve until interrupted.  ``port`` 0 takes a free port (``on_ready`` learns which)."""
    import waitress

    pictures.warm_up()  # matplotlib's import and font cache now, not on the first picture
    loopback_only = is_loopback(host)
    app: Guard = make_app(database, loopback_only=loopback_only, connections=threads)
    try:
        with app.site.connections.connection() as conn:
            facts = wq.session_facts(conn)
        try:
            server = waitress.create_server(app, host=host, port=port, threads=threads, ident="crh web")
        except OSError as exc:
            raise WebError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                "choose another port with --port (or --port 0 for any free one)"
            ) from None
        shown = f"[{host}]" if ":" in host else host
        on_ready(Serving(f"http://{shown}:{server.effective_port}/", facts["login"], facts["privileged"], loopback_only))
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.close()
    finally:
        app.close()
