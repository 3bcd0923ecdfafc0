"""The stand-in solvers' settings, and the record of what a run wrote.

Split from standin.py (which stays the solver itself: reading inputs and
writing the fake outputs) so each stays short; like it, this imports only
builtin stdlib modules, as it is loaded once per solver run.

Settings are ``key = value`` lines in exe/standin.cfg or the environment:

    fail        none | error_dat | exit | signal | missing_output | partial | hang
    sleep       seconds to sleep before working (float)
    iterations  CRTomo iterations to write (default 3)
    exit_code   the status of ``fail = exit`` (1-255, default 3)
    signal      the signal of ``fail = signal`` (KILL, TERM, SEGV, ABRT, ...; default KILL)
    large       bytes of a deterministic, incompressible large.bin to write
                beside the outputs (mod/ or inv/; default 0: none)
    tag         a name for this tomodir in the records below

A key may be made solver specific (``fail_crtomo = error_dat`` fails only
the inversion of a modelling+inversion job). Lookup order per key:
standin.cfg ``key_solver``, standin.cfg ``key``, env
``CRH_STANDIN_KEY_SOLVER``, env ``CRH_STANDIN_KEY``.

With ``CRH_STANDIN_MARK=<dir>``, a run that ends by itself (results or
error.dat) records what it wrote in ``<dir>/written/<tag>-<solver>-<pid>.json``:
each file's path relative to the tomodir and its SHA-256, so a fault test
can check that a retrieved result is byte for byte what a solver wrote.
"""

from __future__ import annotations

import os
import signal
import sys

FAIL_MODES = ("none", "error_dat", "exit", "signal", "missing_output", "partial", "hang")
SETTINGS_FILE = "standin.cfg"
SETTINGS = ("fail", "sleep", "iterations", "exit_code", "signal", "large", "tag")
EXIT_STATUS = 3


class UsageError(Exception):
    """A mistake in the stand-in's own settings: exit 2 so a test notices."""


def _raw(solver: str) -> dict[str, str]:
    cfg: dict[str, str] = {}
    if os.path.exists(SETTINGS_FILE):
        with open(SETTINGS_FILE, encoding="utf-8") as fh:
            for number, raw in enumerate(fh, 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                key, sep, value = line.partition("=")
                if not sep:
                    raise UsageError(f"{SETTINGS_FILE} line {number}: expected 'key = value', got {raw.strip()!r}")
                cfg[key.strip().lower()] = value.strip()
    found = {}
    for key in SETTINGS:
        for value in (
            cfg.get(f"{key}_{solver}"),
            cfg.get(key),
            os.environ.get(f"CRH_STANDIN_{key.upper()}_{solver.upper()}"),
            os.environ.get(f"CRH_STANDIN_{key.upper()}"),
        ):
            if value is not None and value != "":
                found[key] = value
                break
    return found


class Settings:
    """The parsed settings of one run of ``solver`` (see the module docstring)."""

    def __init__(self, solver: str) -> None:
        raw = _raw(solver)
        self.fail = raw.get("fail", "none").lower()
        if self.fail not in FAIL_MODES:
            raise UsageError(f"unknown fail mode {self.fail!r}: use one of {', '.join(FAIL_MODES)}")
        try:
            self.sleep = float(raw.get("sleep", "0"))
            self.iterations = int(raw.get("iterations", "3"))
            self.exit_code = int(raw.get("exit_code", str(EXIT_STATUS)))
            self.large = int(raw.get("large", "0"))
        except ValueError as exc:
            raise UsageError(f"bad stand-in setting: {exc}") from None
        if self.iterations < 1:
            raise UsageError("iterations must be at least 1")
        if not 1 <= self.exit_code <= 255:
            raise UsageError(f"exit_code must be 1-255, not {self.exit_code}")
        if self.large < 0:
            raise UsageError(f"large must be a number of bytes, not {self.large}")
        name = raw.get("signal", "KILL").upper()
        try:
            self.signal = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        except KeyError:
            raise UsageError(f"unknown signal {raw.get('signal')!r}: use a name such as KILL, TERM or SEGV") from None
        self.tag = raw.get("tag", "untagged")
        if not self.tag.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UsageError(f"tag {self.tag!r}: use letters, digits, '-', '_' and '.' only")


def record(solver: str, tag: str, outcome: str, written: set[str]) -> None:
    """Write ``<mark>/written/<tag>-<solver>-<pid>.json``: what this run wrote, by SHA-256.

    Written whole under a temporary name, then renamed, so a reader never
    sees half a record; a run killed before it ends records nothing."""
    directory = os.environ.get("CRH_STANDIN_MARK")
    if not directory:
        return
    import hashlib  # only here: most runs record nothing
    import json

    files = {}
    for path in sorted(written):
        rel = os.path.normpath(os.path.join("exe", path))
        try:
            with open(path, "rb") as fh:
                files[rel] = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError:
            files[rel] = None
    entry = {"tag": tag, "solver": solver, "pid": os.getpid(), "cwd": os.getcwd(), "outcome": outcome, "files": files}
    target = os.path.join(directory, "written")
    try:
        os.makedirs(target, exist_ok=True)
        name = os.path.join(target, f"{tag}-{solver}-{os.getpid()}.json")
        with open(name + ".tmp", "w") as fh:
            json.dump(entry, fh)
        os.replace(name + ".tmp", name)
    except OSError as exc:
        print(f"stand-in: cannot record what it wrote in {target}: {exc}", file=sys.stderr)
