"""Where the database and the solvers are.

Every command resolves its settings here, so the precedence rules of the
design's Contract live in exactly one place: for the database, the ``--db``
option, then ``CRH_DATABASE_URL``, then ``[database] url`` of the user's
config file, then of the system-wide one, then cr_hydra's ``~/.crhydra.cfg``,
else the embedded cluster.  Solver paths come from the config files,
overridden by ``CRH_CRTOMO``/``CRH_CRMOD``, overridden by the worker's options.

Nothing here touches the database; errors are :class:`ConfigError` whose
messages name the file, the problem and the remedy, because the CLI shows
them to users verbatim (exit code 2, no traceback).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import platformdirs

if TYPE_CHECKING:
    from cr_queue.tomodir.archive import Limits

__all__ = ["ConfigError", "Settings", "load", "redact", "SYSTEM_CONFIG"]

T = TypeVar("T")

SYSTEM_CONFIG = Path("/etc/cr_queue/config.toml")
LEGACY_NAME = ".crhydra.cfg"
SOLVERS = ("crtomo", "crmod")
# A server that accepts the connection and never answers must not hold a command
# for psycopg's own default (130 s): every command gives up after this long.
DEFAULT_CONNECT_TIMEOUT = 10
# [database] pooler / CRH_DATABASE_POOLER: what stands between cr_queue and
# PostgreSQL.  "transaction": a pooler in transaction pooling mode (PgBouncer's
# pool_mode = transaction), which hands each transaction any server connection,
# so nothing may rest on the session (prepared statements, SET, LISTEN, session
# advisory locks); "none" (the default): PostgreSQL itself, or a session pooler.
POOLERS = ("none", "transaction")


class ConfigError(Exception):
    """A configuration problem the user has to fix; the message says how."""


@dataclass(frozen=True)
class Settings:
    """The resolved configuration; ``raw`` keeps the TOML for later sections."""

    database_url: str | None
    database_source: str
    crtomo: str | None
    crmod: str | None
    config_path: Path | None
    raw: dict[str, Any] = field(default_factory=dict)
    # Seconds a connection may take before the command gives up on the server
    # (CRH_CONNECT_TIMEOUT, else [database] connect_timeout, else 10).
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT
    # Whether the database is reached through a transaction-pooling pooler
    # (CRH_DATABASE_POOLER, else [database] pooler, else "none").
    pooled: bool = False


@dataclass(frozen=True)
class _ConfigFile:
    path: Path
    data: dict[str, Any]
    system: bool
    unreadable: bool = False


def load(
    *,
    db: str | None = None,
    crtomo: str | None = None,
    crmod: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve the settings; ``db``/``crtomo``/``crmod`` are command-line values."""
    env = os.environ if env is None else env
    files = _config_files(env)
    database_url, source = _resolve_database(db, env, files)
    hidden = next((f.path for f in files if f.unreadable), None)
    if database_url is None and hidden is not None:
        raise ConfigError(
            f"{hidden}: the system-wide config is not readable by you, and it may name the "
            "group's database. Ask the admin to add you to its group (e.g. `adduser $USER crh`), "
            "or name the database yourself with --db, CRH_DATABASE_URL or your own config file."
        )
    solvers = {
        name: _resolve_solver(name, option, env, files)
        for name, option in (("crtomo", crtomo), ("crmod", crmod))
    }
    return Settings(
        database_url=database_url,
        database_source=source,
        crtomo=solvers["crtomo"],
        crmod=solvers["crmod"],
        config_path=files[0].path if files else None,
        raw=_merge([f.data for f in reversed(files)]),
        connect_timeout=_resolve_connect_timeout(env, files),
        pooled=_resolve_pooler(env, files) == "transaction",
    )


def redact(url_or_conninfo: str) -> str:
    """Hide the password so URLs can be logged and shown in errors."""
    text = url_or_conninfo
    match = re.match(r"(?i)(postgres(?:ql)?(?:\+\w+)?://)(.*)$", text)
    if match is None:
        return _CONNINFO_PASSWORD.sub(r"\1***", text)
    scheme, rest = match.groups()
    query_at = rest.find("?")
    end = len(rest) if query_at < 0 else query_at
    at = rest.rfind("@", 0, end)
    if at >= 0 and ":" in rest[:at]:
        user = rest[:at].split(":", 1)[0]
        rest = f"{user}:***{rest[at:]}"
    return scheme + _QUERY_PASSWORD.sub(r"\1***", rest)


_CONNINFO_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']\S*)")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)([^&#]*)")


def _config_files(env: Mapping[str, str]) -> list[_ConfigFile]:
    """The TOML files in priority order; an explicit ``CRH_CONFIG`` must exist."""
    files: list[_ConfigFile] = []
    explicit = env.get("CRH_CONFIG")
    if explicit:
        user_path = Path(explicit).expanduser()
        if not user_path.exists():
            raise ConfigError(
                f"{user_path}: config file named by CRH_CONFIG does not exist; "
                "create it, or unset CRH_CONFIG to use the default location "
                f"{platformdirs.user_config_path('cr_queue') / 'config.toml'}"
            )
    else:
        user_path = platformdirs.user_config_path("cr_queue") / "config.toml"
    if user_path.exists():
        files.append(_ConfigFile(user_path, _read_toml(user_path), system=False))
    system_path = Path(env.get("CRH_SYSTEM_CONFIG") or SYSTEM_CONFIG)
    if system_path.exists() and system_path != user_path:
        if os.access(system_path, os.R_OK):
            files.append(_ConfigFile(system_path, _read_toml(system_path), system=True))
        else:
            # The system file is the workers' (0640 root:crh); a scientist may not read it.
            files.append(_ConfigFile(system_path, {}, system=True, unreadable=True))
    for config in files:
        _validate(config)
    return files


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read config file ({exc.strerror or exc}); "
            "make it readable by this user or point CRH_CONFIG elsewhere"
        ) from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: config file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid TOML: {exc}; fix the syntax there (format: https://toml.io)"
        ) from exc


def _validate(config: _ConfigFile) -> None:
    """Check types and permissions once, so later code can trust ``raw``."""
    path, data = config.path, config.data
    for section, keys in (("database", ("url",)), ("solvers", SOLVERS), ("store", ("path",))):
        table = _table(path, data, section)
        for key in keys:
            _check_text(path, section, key, table.get(key))
    _validate_archive(path, _table(path, data, "archive"))
    _validate_cleanup(path, _table(path, data, "cleanup"))
    timeout = _table(path, data, "database").get("connect_timeout")
    if timeout is not None and _seconds(timeout) is None:
        raise ConfigError(
            f"{path}: [database] connect_timeout = {timeout!r} is not a whole number of seconds >= 1; "
            f"write e.g. connect_timeout = {DEFAULT_CONNECT_TIMEOUT}"
        )
    pooler = _table(path, data, "database").get("pooler")
    if pooler is not None and _pooler(pooler) is None:
        raise ConfigError(
            f"{path}: [database] pooler = {pooler!r} is not a pooling mode cr_queue knows; "
            f'write pooler = "transaction" when the URL names PgBouncer in transaction pooling mode, '
            'or pooler = "none" (the default) for PostgreSQL itself or a session-pooling pooler'
        )
    if _has_password(data):
        _require_private(path, system=config.system)


def _table(path: Path, data: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    """A section of the file (empty where the file has none), which must be a TOML table."""
    table = data.get(section, {})
    if not isinstance(table, dict):
        article = "an" if section[0] in "aeiou" else "a"
        raise ConfigError(f"{path}: '{section}' must be a table; write it as {article} [{section}] section")
    return table


def _check_text(path: Path, section: str, key: str, value: Any) -> None:
    """A setting that is text (a URL, a path) is a non-empty string, or absent."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(
            f"{path}: [{section}] {key} must be a string, got "
            f"{type(value).__name__}; quote it, e.g. {key} = \"...\""
        )
    if not value.strip():
        raise ConfigError(f"{path}: [{section}] {key} is empty; set a value or remove the line")


ARCHIVE_KEYS = {"max_unpacked_size": "max_bytes", "max_members": "max_members"}
_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*")
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _validate_archive(path: Path, table: Mapping[str, Any]) -> None:
    """[archive] max_unpacked_size = "4G", max_members = 100000: the caps of safe extraction."""
    for key, value in table.items():
        if key not in ARCHIVE_KEYS:
            raise ConfigError(
                f"{path}: [archive] {key} is not a setting; the settings are {', '.join(ARCHIVE_KEYS)}"
            )
        if _archive_value(key, value) is None:
            example = '"4G"' if key == "max_unpacked_size" else "100000"
            raise ConfigError(
                f"{path}: [archive] {key} = {value!r} is not a positive "
                f"{'size' if key == 'max_unpacked_size' else 'whole number'}; write e.g. {key} = {example}"
            )


def _archive_value(key: str, value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if key == "max_unpacked_size" and isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
        return number if number > 0 else None
    return None


def archive_limits(settings: Settings) -> Limits:
    """The caps of safe extraction this installation chose ([archive]), for whoever unpacks."""
    # Imported here: the archive modules load zstandard, which only commands that unpack need.
    from cr_queue.tomodir.archive import Limits

    table = settings.raw.get("archive") or {}
    return Limits(**{ARCHIVE_KEYS[key]: _archive_value(key, value) for key, value in table.items() if key in ARCHIVE_KEYS})


def _seconds(value: Any) -> int | None:
    """A connect timeout: whole seconds, at least 1 (a string of digits is taken too, as from the environment)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and value >= 1 else None


def _resolve_connect_timeout(env: Mapping[str, str], files: list[_ConfigFile]) -> int:
    """CRH_CONNECT_TIMEOUT, else [database] connect_timeout of the first file that has one, else the default."""
    return _database_setting(
        env, files, "CRH_CONNECT_TIMEOUT", "connect_timeout", _seconds, DEFAULT_CONNECT_TIMEOUT,
        f"is not a whole number of seconds >= 1; set it to e.g. {DEFAULT_CONNECT_TIMEOUT}, or unset it",
    )


def _pooler(value: Any) -> str | None:
    """A pooler setting: "none" or "transaction" (any case, spaces around ignored); None if it is neither."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text if text in POOLERS else None


def _resolve_pooler(env: Mapping[str, str], files: list[_ConfigFile]) -> str:
    """CRH_DATABASE_POOLER, else [database] pooler of the first file that has one, else "none"."""
    return _database_setting(
        env, files, "CRH_DATABASE_POOLER", "pooler", _pooler, "none",
        "is not a pooling mode cr_queue knows; set it to transaction when the database URL names PgBouncer "
        "in transaction pooling mode, to none for PostgreSQL itself or a session-pooling pooler, or unset it",
    )


def _database_setting(
    env: Mapping[str, str], files: list[_ConfigFile], variable: str, key: str,
    parse: Callable[[Any], T | None], default: T, remedy: str,
) -> T:
    """A [database] setting: the environment variable wins (a bad value there is an error: nothing
    else would show it), else the first config file that has the key (already validated), else
    the default."""
    from_env = env.get(variable)
    if from_env:
        value = parse(from_env)
        if value is None:
            raise ConfigError(f"{variable}={from_env!r} {remedy}")
        return value
    for config in files:
        raw = config.data.get("database", {}).get(key)
        if raw is not None:
            return parse(raw) or default
    return default


# [cleanup] keep_retrieved: how long crh_cleanup keeps the archives of retrieved jobs.
DEFAULT_KEEP_RETRIEVED_S = 30 * 86400.0
CLEANUP_KEYS = ("keep_retrieved",)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_duration(value: Any) -> float | None:
    """Seconds of a duration written 0, 90 (seconds), 90s, 15m, 12h, 30d, 2w or 1d12h; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    text = str(value).strip().lower().replace(" ", "")
    if not text:
        return None
    total, at = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != at:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
        at = match.end()
    return total if at == len(text) else None


def _validate_cleanup(path: Path, table: Mapping[str, Any]) -> None:
    for key, value in table.items():
        if key not in CLEANUP_KEYS:
            raise ConfigError(f"{path}: [cleanup] {key} is not a setting; the settings are {', '.join(CLEANUP_KEYS)}")
        if parse_duration(value) is None:
            raise ConfigError(
                f"{path}: [cleanup] {key} = {value!r} is not a duration; write e.g. {key} = \"30d\" "
                "(s, m, h, d, w; \"0\" purges the archives of retrieved jobs at once)"
            )


def keep_retrieved_s(settings: Settings) -> float:
    """How long crh_cleanup keeps the archives of retrieved jobs ([cleanup] keep_retrieved, default 30 days)."""
    value = (settings.raw.get("cleanup") or {}).get("keep_retrieved")
    seconds = parse_duration(value) if value is not None else None
    return DEFAULT_KEEP_RETRIEVED_S if seconds is None else seconds


def _has_password(data: Mapping[str, Any]) -> bool:
    for key, value in data.items():
        if isinstance(value, Mapping):
            if _has_password(value):
                return True
        elif key == "password" and value:
            return True
    url = data.get("database", {}).get("url")
    return isinstance(url, str) and redact(url) != url


def _require_private(path: Path, *, system: bool) -> None:
    """Refuse a password others can read, before anyone else copies it.

    A per-user file must be private (0600).  The system-wide file is meant to
    be shared with a group of users, so only world-readability is refused there.
    """
    mode = path.stat().st_mode
    if system:
        if mode & stat.S_IROTH:
            raise ConfigError(
                f"{path}: contains a database password and is readable by every user; "
                f"run 'chmod 640 {path}' and give it to the group of the cr_queue users "
                f"(chgrp GROUP {path}), or 'chmod 600 {path}'"
            )
    elif mode & (stat.S_IRGRP | stat.S_IROTH):
        raise ConfigError(
            f"{path}: contains a database password and is readable by other users "
            f"(mode {stat.S_IMODE(mode):o}); run 'chmod 600 {path}'"
        )


def _resolve_database(
    option: str | None, env: Mapping[str, str], files: list[_ConfigFile]
) -> tuple[str | None, str]:
    if option is not None:
        if not option.strip():
            raise ConfigError("--db: the database URL is empty; give a URL or omit --db")
        return option, "option"
    from_env = env.get("CRH_DATABASE_URL")
    if from_env:
        return from_env, "env"
    for config in files:
        url = config.data.get("database", {}).get("url")
        if url is not None:
            return url, f"config:{config.path}"
    legacy = _legacy_credentials(env)
    if legacy is not None:
        return legacy
    return None, "embedded"


def _legacy_credentials(env: Mapping[str, str]) -> tuple[str, str] | None:
    """cr_hydra's file, so its users keep working without a new config."""
    home = env.get("HOME")
    path = (Path(home) if home else Path.home()) / LEGACY_NAME
    if not path.exists():
        return None
    import configparser  # only for this file, which few still have

    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read legacy cr_hydra config ({exc.strerror or exc}); "
            "make it readable, or set CRH_DATABASE_URL"
        ) from exc
    except (configparser.Error, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(
            f"{path}: invalid legacy cr_hydra config ({first_line}); it must be INI with "
            "a [general] section and 'db_credentials = ...', or remove the file"
        ) from exc
    credentials = parser.get("general", "db_credentials", fallback="").strip()
    if not credentials:
        return None
    if redact(credentials) != credentials:
        _require_private(path, system=False)
    return _strip_sqlalchemy_driver(credentials), f"legacy:{path}"


def _strip_sqlalchemy_driver(url: str) -> str:
    """cr_hydra handed this to SQLAlchemy, which allows 'postgresql+psycopg2://'."""
    return re.sub(r"(?i)^(postgres(?:ql)?)\+\w+://", r"\1://", url)


def _resolve_solver(
    name: str, option: str | None, env: Mapping[str, str], files: list[_ConfigFile]
) -> str | None:
    if option:
        return option
    from_env = env.get(f"CRH_{name.upper()}")
    if from_env:
        return from_env
    for config in files:
        value = config.data.get("solvers", {}).get(name)
        if value is not None:
            return _expand_home(value, env)
    return None


def _expand_home(value: str, env: Mapping[str, str]) -> str:
    """Expand '~/' with the given environment's HOME, as a shell would have."""
    home = env.get("HOME")
    if home and (value == "~" or value.startswith("~/")):
        return home + value[1:]
    return os.path.expanduser(value)


def _merge(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Later layers win key by key, tables merged, so one file can refine another."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = _merge([merged[key], value])
            else:
                merged[key] = value
    return merged
