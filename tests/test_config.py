"""Configuration precedence, file parsing, redaction and every ConfigError."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import pytest

from cr_queue.config import ConfigError, load, redact


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean HOME and config dirs, so the developer's real files never leak in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("CRH_SYSTEM_CONFIG", str(tmp_path / "etc" / "config.toml"))
    for name in ("CRH_DATABASE_URL", "CRH_CONFIG", "CRH_CRTOMO", "CRH_CRMOD"):
        monkeypatch.delenv(name, raising=False)
    return home


def user_config(text: str, mode: int = 0o600) -> Path:
    path = platformdirs.user_config_path("cr_queue") / "config.toml"
    return write(path, text, mode)


def system_config(text: str, mode: int = 0o644) -> Path:
    return write(Path(os.environ["CRH_SYSTEM_CONFIG"]), text, mode)


def legacy_config(home: Path, text: str, mode: int = 0o600) -> Path:
    return write(home / ".crhydra.cfg", text, mode)


def write(path: Path, text: str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_nothing_configured_means_embedded(home: Path) -> None:
    settings = load()
    assert settings.database_url is None
    assert settings.database_source == "embedded"
    assert settings.crtomo is None and settings.crmod is None
    assert settings.config_path is None
    assert settings.raw == {}


def test_database_precedence(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = legacy_config(home, "[general]\ndb_credentials = dbname=legacy\n")
    system = system_config('[database]\nurl = "postgresql:///system"\n')
    user = user_config('[database]\nurl = "postgresql:///user"\n')
    monkeypatch.setenv("CRH_DATABASE_URL", "postgresql:///env")

    settings = load(db="postgresql:///option")
    assert (settings.database_url, settings.database_source) == ("postgresql:///option", "option")
    settings = load()
    assert (settings.database_url, settings.database_source) == ("postgresql:///env", "env")
    monkeypatch.delenv("CRH_DATABASE_URL")
    settings = load()
    assert (settings.database_url, settings.database_source) == ("postgresql:///user", f"config:{user}")
    assert settings.config_path == user
    user.unlink()
    settings = load()
    assert (settings.database_url, settings.database_source) == ("postgresql:///system", f"config:{system}")
    assert settings.config_path == system
    system.unlink()
    settings = load()
    assert (settings.database_url, settings.database_source) == ("dbname=legacy", f"legacy:{legacy}")
    legacy.unlink()
    assert load().database_source == "embedded"


def test_config_without_database_falls_through_to_legacy(home: Path) -> None:
    user_config('[solvers]\ncrtomo = "/opt/CRTomo"\n')
    legacy = legacy_config(home, "[general]\ndb_credentials = dbname=old\n")
    settings = load()
    assert settings.database_source == f"legacy:{legacy}"
    assert settings.crtomo == "/opt/CRTomo"


def test_empty_env_var_counts_as_unset(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRH_DATABASE_URL", "")
    monkeypatch.setenv("CRH_CRTOMO", "")
    user_config('[database]\nurl = "postgresql:///user"\n[solvers]\ncrtomo = "/c/CRTomo"\n')
    settings = load()
    assert settings.database_url == "postgresql:///user"
    assert settings.crtomo == "/c/CRTomo"


def test_empty_db_option_is_an_error(home: Path) -> None:
    with pytest.raises(ConfigError, match="--db"):
        load(db="  ")


def test_explicit_env_mapping_replaces_os_environ(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRH_DATABASE_URL", "postgresql:///from-os")
    settings = load(env={"HOME": str(home), "CRH_CRMOD": "/env/CRMod"})
    assert settings.database_source == "embedded"
    assert settings.crmod == "/env/CRMod"


def test_solver_precedence(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system_config('[solvers]\ncrtomo = "/sys/CRTomo"\ncrmod = "/sys/CRMod"\n')
    user_config('[solvers]\ncrtomo = "~/bin/CRTomo"\n')
    settings = load()
    assert settings.crtomo == f"{home}/bin/CRTomo"
    assert settings.crmod == "/sys/CRMod"
    monkeypatch.setenv("CRH_CRTOMO", "/env/CRTomo")
    monkeypatch.setenv("CRH_CRMOD", "/env/CRMod")
    settings = load()
    assert (settings.crtomo, settings.crmod) == ("/env/CRTomo", "/env/CRMod")
    settings = load(crtomo="/opt/CRTomo", crmod="/opt/CRMod")
    assert (settings.crtomo, settings.crmod) == ("/opt/CRTomo", "/opt/CRMod")


def test_raw_merges_user_over_system(home: Path) -> None:
    system_config('[worker]\nthreads = 4\nname = "sys"\n[other]\nx = 1\n')
    user_config('[worker]\nthreads = 8\n')
    raw = load().raw
    assert raw["worker"] == {"threads": 8, "name": "sys"}
    assert raw["other"] == {"x": 1}


def test_crh_config_names_the_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_config('[database]\nurl = "postgresql:///default-location"\n')
    chosen = write(tmp_path / "elsewhere.toml", '[database]\nurl = "postgresql:///chosen"\n', 0o600)
    monkeypatch.setenv("CRH_CONFIG", str(chosen))
    settings = load()
    assert settings.database_url == "postgresql:///chosen"
    assert settings.config_path == chosen


def test_crh_config_missing_is_an_error(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("CRH_CONFIG", str(missing))
    with pytest.raises(ConfigError) as err:
        load()
    assert str(missing) in str(err.value)
    assert "CRH_CONFIG" in str(err.value)


def test_invalid_toml_names_file_and_line(home: Path) -> None:
    path = user_config('[database]\nurl = "postgresql:///x"\nthis is not toml\n')
    with pytest.raises(ConfigError) as err:
        load()
    message = str(err.value)
    assert str(path) in message
    assert "invalid TOML" in message
    assert "line 3" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[database]\nurl = 5\n", "[database] url must be a string"),
        ('[database]\nurl = ""\n', "[database] url is empty"),
        ('database = "postgresql:///x"\n', "'database' must be a table"),
        ("[solvers]\ncrtomo = ['a']\n", "[solvers] crtomo must be a string"),
        ("[solvers]\ncrmod = true\n", "[solvers] crmod must be a string"),
    ],
)
def test_wrong_types_are_named(home: Path, text: str, expected: str) -> None:
    path = user_config(text)
    with pytest.raises(ConfigError) as err:
        load()
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_unreadable_config_file(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A directory where the file should be is unreadable even for root.
    path = tmp_path / "config.toml"
    path.mkdir()
    monkeypatch.setenv("CRH_CONFIG", str(path))
    with pytest.raises(ConfigError) as err:
        load()
    assert str(path) in str(err.value)
    assert "cannot read" in str(err.value)


def test_non_utf8_config_file(home: Path) -> None:
    path = platformdirs.user_config_path("cr_queue") / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'[database]\nurl = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load()


@pytest.mark.parametrize(
    "text",
    [
        '[database]\nurl = "postgresql://u:secret@host/db"\n',
        '[database]\nurl = "host=h dbname=d password=secret"\n',
        '[database]\nurl = "postgresql://u@host/db?password=secret"\n',
        '[database]\nurl = "postgresql://u@host/db"\npassword = "secret"\n',
    ],
)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_password_readable_by_others_is_refused(home: Path, text: str, mode: int) -> None:
    path = user_config(text, mode=mode)
    with pytest.raises(ConfigError) as err:
        load()
    assert f"chmod 600 {path}" in str(err.value)
    assert "secret" not in str(err.value)


def test_private_file_with_password_is_fine(home: Path) -> None:
    user_config('[database]\nurl = "postgresql://u:secret@host/db"\n', mode=0o600)
    assert load().database_url == "postgresql://u:secret@host/db"


def test_readable_file_without_password_is_fine(home: Path) -> None:
    user_config('[database]\nurl = "postgresql://u@host/db"\n', mode=0o644)
    assert load().database_url == "postgresql://u@host/db"


def test_system_file_may_share_a_password_with_a_group(home: Path) -> None:
    system_config('[database]\nurl = "postgresql://u:pw@host/db"\n', mode=0o640)
    assert load().database_url == "postgresql://u:pw@host/db"
    path = system_config('[database]\nurl = "postgresql://u:pw@host/db"\n', mode=0o644)
    with pytest.raises(ConfigError) as err:
        load()
    assert f"chmod 640 {path}" in str(err.value)


def test_legacy_url_with_sqlalchemy_driver(home: Path) -> None:
    legacy_config(home, "[general]\n\ndb_credentials = postgresql+psycopg2://u:p%40w@db.example/cr_hydra\n")
    assert load().database_url == "postgresql://u:p%40w@db.example/cr_hydra"


def test_legacy_conninfo_keeps_percent_signs(home: Path) -> None:
    legacy_config(home, "[general]\ndb_credentials = dbname=x user=y password=a%b host=h\n")
    assert load().database_url == "dbname=x user=y password=a%b host=h"


def test_legacy_password_readable_by_others_is_refused(home: Path) -> None:
    path = legacy_config(home, "[general]\ndb_credentials = dbname=x password=z\n", mode=0o644)
    with pytest.raises(ConfigError) as err:
        load()
    assert f"chmod 600 {path}" in str(err.value)


def test_legacy_without_credentials_is_ignored(home: Path) -> None:
    legacy_config(home, "[general]\nother = 1\n")
    assert load().database_source == "embedded"


def test_legacy_invalid_ini(home: Path) -> None:
    path = legacy_config(home, "db_credentials = no section header\n")
    with pytest.raises(ConfigError) as err:
        load()
    assert str(path) in str(err.value)
    assert "[general]" in str(err.value)


def test_legacy_not_read_when_something_else_wins(home: Path) -> None:
    legacy_config(home, "this is not an INI file\n")
    assert load(db="postgresql:///x").database_source == "option"


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("postgresql://u:SECRET@h/db", "postgresql://u:***@h/db"),
        ("postgres://u:SECRET@h:5432/db?sslmode=require", "postgres://u:***@h:5432/db?sslmode=require"),
        ("postgresql://u:p@ss@h1,h2:5433/db", "postgresql://u:***@h1,h2:5433/db"),
        ("postgresql://u@h/db?sslmode=require&password=SECRET&x=1", "postgresql://u@h/db?sslmode=require&password=***&x=1"),
        ("postgresql://u@h/db?password=SECRET", "postgresql://u@h/db?password=***"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql:///db?host=/tmp/x", "postgresql:///db?host=/tmp/x"),
        ("dbname=x user=y password=SECRET host=h", "dbname=x user=y password=*** host=h"),
        ("dbname=x password = 'SE CRET\\'s' host=h", "dbname=x password = *** host=h"),
        ("dbname=x user=y", "dbname=x user=y"),
    ],
)
def test_redact(given: str, shown: str) -> None:
    assert redact(given) == shown
    assert "SECRET" not in redact(given)


def test_unreadable_system_config_is_skipped_when_the_database_is_named_elsewhere(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packaged /etc/cr_queue/config.toml is 0640 root:crh: scientists outside the group
    must still be able to work with their own settings."""
    import cr_queue.config as config_module

    hidden = system_config('[database]\nurl = "postgresql://crh:secret@db/crq"\n', mode=0o640)
    real_access = os.access
    monkeypatch.setattr(
        config_module.os, "access", lambda path, mode: False if Path(path) == hidden else real_access(path, mode)
    )
    monkeypatch.setenv("CRH_DATABASE_URL", "postgresql://alice@db/crq")
    assert load().database_url == "postgresql://alice@db/crq"
    monkeypatch.delenv("CRH_DATABASE_URL")
    with pytest.raises(ConfigError, match="not readable by you.*adduser"):
        load()


def test_pooler_defaults_to_none_and_the_environment_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRH_DATABASE_POOLER", raising=False)
    assert load().pooled is False
    user_config('[database]\nurl = "postgresql://crh@pgbouncer/crqueue"\npooler = "transaction"\n')
    assert load().pooled is True
    monkeypatch.setenv("CRH_DATABASE_POOLER", "none")
    assert load().pooled is False
    user_config('[database]\npooler = "none"\n')
    monkeypatch.setenv("CRH_DATABASE_POOLER", "transaction")
    assert load().pooled is True


def test_pooler_of_the_user_config_wins_over_the_system_one(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRH_DATABASE_POOLER", raising=False)
    system_config('[database]\npooler = "transaction"\n')
    assert load().pooled is True
    user_config('[database]\npooler = "none"\n')
    assert load().pooled is False


@pytest.mark.parametrize("bad", ['"session"', '"transactions"', '""', "true", "1"])
def test_a_bad_configured_pooler_is_refused_with_the_remedy(home: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.delenv("CRH_DATABASE_POOLER", raising=False)
    path = user_config(f"[database]\npooler = {bad}\n")
    with pytest.raises(ConfigError) as err:
        load()
    message = str(err.value)
    assert message.startswith(f"{path}: [database] pooler = ")
    assert "is not a pooling mode cr_queue knows" in message and 'write pooler = "transaction"' in message


def test_a_bad_pooler_in_the_environment_is_refused_with_the_remedy(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRH_DATABASE_POOLER", "pgbouncer")
    with pytest.raises(ConfigError, match=r"CRH_DATABASE_POOLER='pgbouncer' is not a pooling mode .* set it to transaction"):
        load()
