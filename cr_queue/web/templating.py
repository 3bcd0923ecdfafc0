"""The Jinja2 environment of the pages: templates from the package, everything escaped.

Autoescaping is on for every template: paths, reasons, logs and error.dat
come from users and solvers and are shown as text, never as markup.
"""

from __future__ import annotations

from urllib.parse import urlencode

import jinja2

from cr_queue.util.times import when


def span(seconds: float | None) -> str:
    """A length of time as a person reads it at a glance: 8 s, 12 min, 3.5 h, 2.1 d."""
    if seconds is None:
        return "-"
    s = max(float(seconds), 0.0)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def nbytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def query(params: dict[str, object]) -> str:
    """A URL query from the non-empty values of ``params``."""
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cr_queue.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, span=span, nbytes=nbytes, query=query)
    return env
