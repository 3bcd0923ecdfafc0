"""Finding the PostgreSQL server binaries the embedded cluster runs.

The system's installation comes first because distributions patch and update
it; the pgserver wheel is the fallback that makes a pip install enough.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from cr_queue.db.embedded.errors import EmbeddedError

REQUIRED_BINARIES = ("postgres", "initdb", "pg_ctl", "createdb")


def find_bindir(env: Mapping[str, str] | None = None, *, major: str | None = None) -> Path:
    """Where ``postgres``, ``initdb`` and ``pg_ctl`` are.

    ``major`` asks for a given major version, so an existing cluster is not
    handed to a newer server that cannot read its files.
    """
    env = os.environ if env is None else env
    explicit = env.get("CRH_PG_BINDIR")
    if explicit:
        bindir = Path(explicit)
        if not has_server_binaries(bindir):
            raise EmbeddedError(
                f"CRH_PG_BINDIR={explicit} does not contain {', '.join(REQUIRED_BINARIES)}; "
                "point it to the bin directory of a PostgreSQL server installation, or unset it"
            )
        return bindir
    found: list[Path] = []
    for bindir in _candidate_bindirs(env):
        if bindir in found or not has_server_binaries(bindir):
            continue
        found.append(bindir)
        if major is None or major_version(server_version(bindir)) == major:
            return bindir
    if found:
        versions = ", ".join(f"{server_version(b)} in {b}" for b in found)
        raise EmbeddedError(
            f"the embedded cluster needs PostgreSQL {major} but only found {versions}; "
            f"install PostgreSQL {major} server binaries and set CRH_PG_BINDIR to their bin "
            "directory, or move the old cluster away to start a new empty one"
        )
    raise EmbeddedError(
        "no PostgreSQL server binaries (postgres, initdb, pg_ctl) found for the embedded "
        "database; install them (Debian: apt install postgresql), or `pip install pgserver`, "
        "or configure a database server with --db, CRH_DATABASE_URL or [database] url"
    )


def _candidate_bindirs(env: Mapping[str, str]) -> Iterator[Path]:
    search_path = env.get("PATH", os.defpath)
    pg_config = shutil.which("pg_config", path=search_path)
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            yield Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    yield from (Path(p) for p in sorted(versioned, key=_debian_version_key, reverse=True))
    postgres = shutil.which("postgres", path=search_path)
    if postgres:
        yield Path(postgres).resolve().parent
    wheel = pgserver_bindir()
    if wheel is not None:
        yield wheel


def _debian_version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def pgserver_bindir() -> Path | None:
    """The wheel's binaries, located without importing it (its import chmods dirs)."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in REQUIRED_BINARIES)


@functools.lru_cache(maxsize=None)
def server_version(bindir: Path) -> str:
    """The server's version, e.g. "16.2"; root may ask, only running needs a user."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(
            f"cannot run {bindir / 'postgres'} --version ({exc}); "
            "check the PostgreSQL installation or set CRH_PG_BINDIR"
        ) from exc
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
    return match.group(1) if match else out.strip()


def major_version(version: str) -> str:
    """Major version as PG_VERSION writes it: "16" for 16.2, "9.6" for 9.6.24."""
    parts = re.findall(r"\d+", version)
    if not parts:
        return version
    return parts[0] if int(parts[0]) >= 10 else ".".join(parts[:2])
