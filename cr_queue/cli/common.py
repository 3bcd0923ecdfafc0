"""What every command shares: database options, output modes, error handling, exit codes.

Exit codes are a contract: 0 success, 1 some items failed (each reported),
2 usage or configuration error.  Expected errors print one message that
names the thing, the problem and the remedy, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cr_queue import config

if TYPE_CHECKING:
    from cr_queue.db import connection as db
    from cr_queue.targets import Selection

# Errors whose message is the whole story, besides config's: (module, class).
# Those modules are imported only by the commands that use them (crh_add forks
# its helpers before it imports the database driver; crh_add and crh_retrieve
# need no solvers), and none of their errors can occur before they are.
_LAZY_ERRORS = (
    ("cr_queue.db.connection", "DatabaseError"),
    ("cr_queue.solvers.solvers", "SolverError"),
    ("cr_queue.db.embedded", "EmbeddedError"),
)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one message and exit 2, not as a traceback.

    Evaluated whenever an exception leaves a command (the SystemExit of every
    normal end included), so it imports nothing."""
    found: list[type[BaseException]] = [config.ConfigError]
    for module, name in _LAZY_ERRORS:
        error = getattr(sys.modules.get(module), name, None)
        if error is not None:
            found.append(error)
    return tuple(found)


@dataclass
class Output:
    """How a command reports: plain lines, JSON for scripts, or nothing but errors."""

    json: bool = False
    quiet: bool = False

    @property
    def color(self) -> bool:
        return sys.stdout.isatty() and "NO_COLOR" not in os.environ

    @property
    def interactive(self) -> bool:
        return sys.stderr.isatty() and not self.json and not self.quiet

    def line(self, message: str, *, fg: str | None = None) -> None:
        if self.json or self.quiet:
            return
        click.echo(click.style(message, fg=fg) if (fg and self.color) else message)

    def warn(self, message: str) -> None:
        if not self.json:
            click.echo(click.style(message, fg="yellow") if self.color else message, err=True)

    def emit(self, payload: dict[str, Any]) -> None:
        if self.json:
            click.echo(json.dumps(payload, indent=2, default=str))


def fail(message: str, code: int = 2) -> None:
    prog = Path(sys.argv[0]).name or "crh"
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except expected_errors() as exc:
            fail(str(exc), 2)
        except Exception as exc:
            _database_error(exc)
            raise

    return wrapper


def _database_error(exc: Exception) -> None:
    """Exit with a message for the driver's errors that mean "ask the admin" or "try again";
    return for anything else.  (The driver is not imported before a command needs it.)"""
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "permission denied"
        fail(
            f"the database refused this role: {detail}. Ask the admin to grant it the right "
            "role: `crh db grant-user NAME` for a scientist, `crh db grant-worker NAME` for a "
            "compute node (see docs/security.md).",
            2,
        )
    if isinstance(exc, psycopg.OperationalError):
        detail = config.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "connection lost")
        fail(
            f"lost the connection to the database ({detail}). Nothing was left half-done: "
            "run the command again once the database is back (crh_add resumes interrupted "
            "registrations, crh_retrieve interrupted retrievals).",
            2,
        )


def db_option(fn: Callable) -> Callable:
    return click.option(
        "--db",
        "db_url",
        metavar="URL",
        default=None,
        help="Database URL (else CRH_DATABASE_URL, the config file, ~/.crhydra.cfg, or the embedded database).",
    )(fn)


def output_options(fn: Callable) -> Callable:
    fn = click.option("--json", "as_json", is_flag=True, help="Print a JSON report for scripts.")(fn)
    fn = click.option("--quiet", "-Q", is_flag=True, help="Print only errors.")(fn)
    fn = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="warning",
        show_default=True,
        help="Detail of the diagnostic log on stderr.",
    )(fn)
    return fn


def reports(fn: Callable) -> Callable:
    """The options every reporting command takes (--json, --quiet, --log-level), made into
    its ``out``: logging is set up, and an expected error becomes one message and exit 2.

    Use it under the command's own options and above the function, which takes
    ``out`` instead of ``as_json``, ``quiet`` and ``log_level``."""

    @functools.wraps(fn)
    def command(*args: Any, as_json: bool, quiet: bool, log_level: str, **kwargs: Any) -> Any:
        setup_logging(log_level)
        return fn(*args, out=Output(json=as_json, quiet=quiet), **kwargs)

    return output_options(handle_errors(command))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def open_db(db_url: str | None, **settings_kw: Any) -> tuple[config.Settings, db.Database]:
    from cr_queue.database import open_database

    settings = config.load(db=db_url, **settings_kw)
    return settings, open_database(settings)


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90, 90s, 15m, 2h, 1d, 1h30m."""

    name = "duration"
    _units = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        total, number = 0.0, ""
        try:
            for ch in text:
                if ch.isdigit() or ch == ".":
                    number += ch
                elif ch in self._units and number:
                    total += float(number) * self._units[ch]
                    number = ""
                else:
                    raise ValueError
            if number:
                total += float(number)
        except ValueError:
            total = -1
        if not text or total <= 0:
            self.fail(f"{value!r} is not a duration; write e.g. 90, 90s, 15m, 2h or 1h30m", param, ctx)
        if total > MAX_DURATION_S:
            self.fail(f"{value!r} is longer than ten years; write e.g. 90, 90s, 15m, 2h or 1h30m", param, ctx)
        return total


# Longer is a typo, and would not fit the database's integer seconds.
MAX_DURATION_S = 10 * 365 * 86400
DURATION = Duration()


class GroupName(click.ParamType):
    """A queue group: a short name, safe to show in any terminal or log."""

    name = "group"
    _pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}")

    def convert(self, value, param, ctx):
        if not self._pattern.fullmatch(str(value)):
            self.fail(
                f"{value!r} is not a group name: use up to 63 letters, digits, '_', '.', '+' or '-', "
                "starting with a letter or digit",
                param,
                ctx,
            )
        return str(value)


class Label(click.ParamType):
    """Free text shown to others (a worker's name): printable, one line, not too long."""

    name = "text"
    max_length = 100

    def convert(self, value, param, ctx):
        text = str(value)
        if not text.strip() or not text.isprintable() or len(text) > self.max_length:
            self.fail(
                f"{value!r} must be printable text of 1 to {self.max_length} characters on one line",
                param,
                ctx,
            )
        return text


GROUP = GroupName()
LABEL = Label()


targets_argument = click.argument("targets", nargs=-1, required=True)
"""Jobs named the way users do: job ids, tomodirs, .crh files (see :func:`select_jobs`)."""


def select_jobs(targets) -> Selection:
    """Job ids from ids, tomodirs and .crh files; a usage error when none of them names a job."""
    from cr_queue.targets import select

    selection = select(list(targets))
    if not selection.ids and selection.problems:
        fail("; ".join(selection.problems))
    return selection
