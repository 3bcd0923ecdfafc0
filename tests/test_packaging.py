"""Packaging and deployment: one version everywhere, debian/ consistent, docs that cannot drift.

Nothing here needs a database. The package build and a real install are
proven by scripts/test-debian-install (a trixie root, too slow for every
run); these tests keep the files it relies on honest:

* the version of pyproject.toml, cr_queue.__version__, the installed
  distribution, `crh --version`, debian/changelog and CHANGELOG.md agree;
* debian/control's Depends match pyproject's requirements with floors that
  Debian 13 (trixie) satisfies, and pgserver stays out;
* every console script has a man page that lists all its options;
* crh-worker@.service starts a crh_worker whose options parse, stops with
  SIGTERM, drains within TimeoutStopSec and is not restarted after exit 3;
* every shell command, config snippet and supervisor/systemd excerpt in
  docs/deployment.md and docs/migrating-from-cr_hydra.md is checked: crh
  command lines parse with the real click commands, the SLURM pilot is run
  with a fake crh_worker and must compute what the docs claim, and commands
  of other tools are tied to the file or step of scripts/test-debian-install
  that runs them.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import click
import pytest

from cr_queue import config as crh_config
from cr_queue.cli import main as cli_main
from cr_queue.cli.common import DURATION

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / "debian"
DOCS = ("deployment.md", "migrating-from-cr_hydra.md")
INSTALL_TEST = REPO / "scripts" / "test-debian-install"
PILOT = REPO / "scripts" / "slurm-pilot.sh"
UNIT = DEBIAN / "crh-worker@.service"

# What Debian 13 (trixie) ships (apt-cache policy in a trixie root): the
# package's floors must not be newer, or it cannot be installed there.
TRIXIE = {
    "python3-psycopg": "3.2.6-1",
    "python3-sqlalchemy": "2.0.40+ds1-1",
    "python3-alembic": "1.13.2-4",
    "python3-click": "8.2.0+0.really.8.1.8-1",
    "python3-platformdirs": "4.3.7-1",
    "python3-zstandard": "0.23.0-4",
}
# pyproject requirement -> Debian package; None: deliberately not a Depends.
DEBIAN_NAME = {
    "psycopg": "python3-psycopg",
    "sqlalchemy": "python3-sqlalchemy",
    "alembic": "python3-alembic",
    "click": "python3-click",
    "platformdirs": "python3-platformdirs",
    "zstandard": "python3-zstandard",
    "pgserver": None,  # PostgreSQL binaries as a wheel; Debian: Recommends postgresql
}
# The optional extra cr_queue[web] (`crh web`) is the binary package cr-queue-web.
TRIXIE_WEB = {
    "python3-bottle": "0.13.2-1.1",
    "python3-waitress": "3.0.2-1",
    "python3-jinja2": "3.1.6-1",
    "python3-matplotlib": "3.10.1+dfsg1-4",
    "python3-numpy": "1:2.2.4+ds-1",
}


# ---------------------------------------------------------------- helpers


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def version() -> str:
    return pyproject()["project"]["version"]


def debian_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"cr-queue \(([^)]+)\) [a-z-]+; urgency=\w+$", first)
    assert match, f"debian/changelog: first line is not 'cr-queue (VERSION) DIST; urgency=...': {first!r}"
    return match.group(1)


def control_paragraphs() -> list[dict[str, str]]:
    paragraphs = []
    for block in (DEBIAN / "control").read_text().strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        paragraphs.append(fields)
    return paragraphs


def relations(field: str) -> dict[str, str | None]:
    """'a (>= 1), b, ${x}' -> {'a': '>= 1', 'b': None}, substitution variables left out."""
    result: dict[str, str | None] = {}
    for item in field.replace("\n", " ").split(","):
        item = item.strip()
        if not item or item.startswith("${"):
            continue
        match = re.fullmatch(r"([a-z0-9.+-]+)(?:\s*\(([^)]*)\))?", item)
        assert match, f"cannot read the relation {item!r}"
        result[match.group(1)] = match.group(2)
    return result


def version_key(text: str) -> tuple:
    """Enough of Debian's version ordering for these floors: numbers compare as numbers."""
    text = re.sub(r"^\d+:", "", text)
    upstream = text.split("+", 1)[0].split("-", 1)[0].split("~", 1)[0]
    return tuple(int(part) for part in re.findall(r"\d+", upstream))


def deb_version_le(a: str, b: str) -> bool:
    if shutil.which("dpkg"):
        return subprocess.run(["dpkg", "--compare-versions", a, "le", b]).returncode == 0
    return version_key(a) <= version_key(b)


def run_entry_point(target: str, args: list[str], prog: str) -> subprocess.CompletedProcess:
    module, func = target.split(":")
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv[0] = {prog!r}; "
        f"from {module} import {func}; sys.exit({func}())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"},
    )


def command_for(name: str) -> click.Command:
    """The click command behind a console script name (crh_add -> crh's 'add')."""
    if name == "crh":
        return cli_main.crh
    verb = name.removeprefix("crh_").replace("_", "-")
    command = cli_main.crh.commands.get(verb)
    assert command is not None, f"{name}: no 'crh {verb}' command behind this console script"
    return command


def dry_parse(argv: list[str]) -> click.Context:
    """Parse a command line with the real click commands, without running anything."""
    name, args = argv[0], argv[1:]
    command = command_for(name)
    ctx = command.make_context(name, list(args))
    while isinstance(command, click.Group):
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:  # click < 8.2
            protected = ctx.protected_args
        rest = [*protected, *ctx.args]
        if not rest:
            break
        sub_name, command, sub_args = command.resolve_command(ctx, rest)
        ctx = command.make_context(sub_name, sub_args, parent=ctx)
    return ctx


def unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def env_file(path: Path) -> dict[str, str]:
    result = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip().strip("\"'")
    return result


def systemd_seconds(text: str) -> float:
    """systemd time spans as used here: 35min, 3h, 90s, 1h 30min."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit_name in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit_name or "s"]
    return total


def exec_start_argv(environment: dict[str, str]) -> list[str]:
    """ExecStart as systemd would expand it: %i/%H, ${VAR} one word, $VAR split."""
    line = unit()["Service.ExecStart"][0]
    line = line.replace("%i", "main").replace("%H", "node01")
    argv: list[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if whole:
            argv += environment.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: environment.get(m.group(1), ""), word))
    return argv


def unit_defaults() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit()["Service.Environment"]:
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def installed_files() -> dict[str, Path]:
    """Destination path in the package -> source file, from debian/cr-queue.install."""
    result = {}
    for line in (DEBIAN / "cr-queue.install").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        source, destination = line.split()
        result["/" + destination.rstrip("/") + "/" + Path(source).name] = REPO / source
    return result


# ---------------------------------------------------------------- versions


def test_one_version_everywhere():
    import cr_queue

    v = version()
    assert cr_queue.__version__ == v, "cr_queue.__version__ differs from pyproject.toml's version"
    assert importlib.metadata.version("cr_queue") == v, (
        "the installed cr_queue distribution has another version than pyproject.toml: "
        "reinstall it (pip install -e .)"
    )
    upstream, _, revision = debian_version().rpartition("-")
    assert upstream == v, (
        f"debian/changelog is at {debian_version()}, pyproject.toml at {v}: "
        f"add a debian/changelog entry '{v}-1' (dch -v {v}-1)"
    )
    assert revision.isdigit(), "debian/changelog's version needs a Debian revision such as -1"


def test_crh_version_prints_the_package_version():
    result = run_entry_point("cr_queue.cli.main:crh", ["--version"], "crh")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cr_queue, version {version()}"


def test_changelog_has_an_entry_for_the_version():
    text = (REPO / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert version() in headings, f"CHANGELOG.md has no '## [{version()}] - DATE' entry"
    entry = text.split(f"## [{version()}]", 1)[1].split("\n## ", 1)[0]
    assert re.match(r" - \d{4}-\d{2}-\d{2}\n", entry), "the CHANGELOG.md entry needs a date: '## [X.Y.Z] - YYYY-MM-DD'"
    assert len(entry.strip().splitlines()) > 3, "the CHANGELOG.md entry says nothing"


def test_debian_changelog_is_well_formed():
    lines = (DEBIAN / "changelog").read_text().splitlines()
    trailer = next(line for line in lines if line.startswith(" -- "))
    assert re.fullmatch(
        r" -- .+ <[^>]+>  \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}", trailer
    ), f"debian/changelog trailer line is malformed: {trailer!r}"


# ---------------------------------------------------------------- debian/control, rules


def test_control_builds_with_pybuild_pyproject():
    source, binary, *_ = control_paragraphs()
    build_deps = relations(source["Build-Depends"])
    assert build_deps["debhelper-compat"] == "= 13"
    for name in ("dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools"):
        assert name in build_deps, f"Build-Depends lacks {name}"
    rules = (DEBIAN / "rules").read_text()
    assert re.search(r"^export PYBUILD_SYSTEM\s*=\s*pyproject$", rules, re.M)
    assert "--with python3 --buildsystem=pybuild" in rules
    assert binary["Package"] == "cr-queue" and binary["Architecture"] == "all"
    assert os.access(DEBIAN / "rules", os.X_OK), "debian/rules must be executable"
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (quilt)"


def test_depends_match_pyproject_with_floors_trixie_satisfies():
    _, binary, *_ = control_paragraphs()
    depends = relations(binary["Depends"])
    assert "${python3:Depends}" in binary["Depends"] and "${misc:Depends}" in binary["Depends"]
    assert relations(binary["Recommends"]).keys() >= {"postgresql"}
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(>=\s*([0-9.]+))?", requirement)
        name, floor = match.group(1).lower(), match.group(4)
        assert name in DEBIAN_NAME, (
            f"pyproject.toml requires {name}, which debian/control does not map: add the Debian "
            "package to Depends and to DEBIAN_NAME in tests/test_packaging.py"
        )
        package = DEBIAN_NAME[name]
        if package is None:
            assert not any(name in dep for dep in depends), f"{name} is not in Debian; it must not be a Depends"
            continue
        assert package in depends, f"Depends lacks {package} (for {requirement})"
        relation = depends[package]
        assert relation and relation.startswith(">="), f"{package} needs a version floor '(>= X)'"
        debian_floor = relation[2:].strip()
        if floor:
            assert version_key(floor) <= version_key(debian_floor), (
                f"{package} (>= {debian_floor}) is older than pyproject's {requirement}"
            )
        assert deb_version_le(debian_floor, TRIXIE[package]), (
            f"{package} (>= {debian_floor}) is newer than trixie's {TRIXIE[package]}: the package "
            "would not install on Debian 13"
        )


def test_the_web_is_a_package_of_its_own_that_compute_nodes_do_without():
    """cr-queue-web depends on cr-queue and on exactly the web extra's packages, with floors
    trixie satisfies; cr-queue itself only suggests it, so a worker node installs none of it."""
    paragraphs = {p["Package"]: p for p in control_paragraphs()[1:]}
    web, base = paragraphs["cr-queue-web"], paragraphs["cr-queue"]
    assert web["Architecture"] == "all" and "metapackage" in web["Description"]
    depends = relations(web["Depends"])
    assert depends.pop("cr-queue") == "= ${binary:Version}"
    extra = pyproject()["project"]["optional-dependencies"]["web"]
    wanted = {}
    for requirement in extra:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(>=\s*([0-9.]+))?", requirement)
        wanted["python3-" + match.group(1).lower()] = match.group(3)
    assert set(depends) == set(wanted) == set(TRIXIE_WEB)
    for package, floor in wanted.items():
        relation = depends[package]
        assert relation and relation.startswith(">="), f"{package} needs a version floor"
        debian_floor = relation[2:].strip()
        assert version_key(floor) <= version_key(debian_floor), f"{package} (>= {debian_floor}) is older than pyproject's {floor}"
        assert deb_version_le(debian_floor, TRIXIE_WEB[package]), f"{package} (>= {debian_floor}) is newer than trixie's"
    assert not set(relations(base["Depends"])) & set(wanted), "cr-queue must not pull the web's dependencies onto nodes"
    assert "cr-queue-web" in relations(base.get("Suggests", ""))
    assert "crh web" in install_script() and "install-web-deb" in install_script()


def test_py3dist_overrides_keep_pgserver_out():
    overrides = (DEBIAN / "py3dist-overrides").read_text().split("\n")
    assert "pgserver" in [line.strip() for line in overrides], "pgserver must map to nothing"
    assert "psycopg python3-psycopg" in overrides


def test_strip_requirements_drops_what_debian_lacks(tmp_path):
    dist = tmp_path / f"cr_queue-{version()}.dist-info"
    dist.mkdir()
    requires = [f"Requires-Dist: {req}" for req in pyproject()["project"]["dependencies"]]
    metadata = "Metadata-Version: 2.1\nName: cr_queue\n" + "\n".join(requires) + "\n\nREADME\n"
    (dist / "METADATA").write_text(metadata)
    (dist / "RECORD").write_text(f"{dist.name}/METADATA,sha256=stale,1\ncr_queue/__init__.py,sha256=x,2\n")
    subprocess.run([str(DEBIAN / "strip-requirements"), str(dist)], check=True, capture_output=True)
    stripped = (dist / "METADATA").read_text()
    assert "pgserver" not in stripped
    assert "psycopg[binary]" not in stripped and re.search(r"^Requires-Dist: psycopg\s*>=", stripped, re.M)
    assert "Requires-Dist: SQLAlchemy" in stripped and "README" in stripped
    digest = base64.urlsafe_b64encode(hashlib.sha256(stripped.encode()).digest()).rstrip(b"=").decode()
    assert f"{dist.name}/METADATA,sha256={digest},{len(stripped.encode())}" in (dist / "RECORD").read_text()


def test_debian_install_lists_existing_files():
    for destination, source in installed_files().items():
        assert source.is_file(), f"debian/cr-queue.install: {source} does not exist"
    for pattern in (DEBIAN / "cr-queue.docs").read_text().split():
        assert list(REPO.glob(pattern)), f"debian/cr-queue.docs: nothing matches {pattern}"
    for name in (DEBIAN / "cr-queue.examples").read_text().split():
        assert (REPO / name).is_file(), f"debian/cr-queue.examples: {name} does not exist"
    links = (DEBIAN / "cr-queue.links").read_text().split()
    assert links == ["usr/lib/python3/dist-packages/cr_queue/sql", "usr/share/cr-queue/sql"]
    assert pyproject()["tool"]["setuptools"]["package-dir"]["cr_queue.sql"] == "sql"
    assert list((REPO / "sql").glob("*.sql")), "no admin queries in sql/"


def test_maintainer_scripts_create_the_user_and_protect_the_config():
    postinst = (DEBIAN / "cr-queue.postinst").read_text()
    assert re.search(r"adduser --system --group .*\bcrh$", postinst, re.M)
    assert "dpkg-statoverride --update --add root crh 0640 \"$CONFIG\"" in postinst
    assert 'CONFIG=/etc/cr_queue/config.toml' in postinst
    assert "dpkg-statoverride --remove /etc/cr_queue/config.toml" in (DEBIAN / "cr-queue.postrm").read_text()
    for script in ("postinst", "postrm", "prerm"):
        path = DEBIAN / f"cr-queue.{script}"
        text = path.read_text()
        assert "#DEBHELPER#" in text and text.startswith("#!/bin/sh\nset -e\n"), path
        subprocess.run(["sh", "-n", str(path)], check=True)


def test_shipped_config_files_are_valid(tmp_path):
    shipped = DEBIAN / "conf" / "config.toml"
    assert tomllib.loads(shipped.read_text()) == {}, "the shipped config must be all comments"
    # Its commented example, uncommented, is a valid cr_queue config.
    example = "\n".join(
        line[1:] for line in shipped.read_text().splitlines() if re.match(r"#(\[|\w+ = )", line)
    )
    path = tmp_path / "config.toml"
    path.write_text(example)
    empty = tmp_path / "user.toml"
    empty.write_text("")
    settings = crh_config.load(env={"CRH_CONFIG": str(empty), "CRH_SYSTEM_CONFIG": str(path), "HOME": str(tmp_path)})
    assert settings.database_url and settings.crtomo and settings.crmod
    env = env_file(DEBIAN / "conf" / "worker-main.env")
    assert env.keys() >= {"CRH_JOBS", "CRH_THREADS", "CRH_DRAIN_TIMEOUT", "CRH_WORKER_ARGS"}
    assert env.keys() <= unit_defaults().keys(), "worker-main.env sets a variable the unit does not use"


# ---------------------------------------------------------------- man pages


def test_every_console_script_has_a_current_man_page():
    scripts = pyproject()["project"]["scripts"]
    pages = {p.stem for p in (DEBIAN / "man").glob("*.1")}
    assert pages == set(scripts), (
        f"debian/man has pages for {sorted(pages - set(scripts))} without a console script and lacks "
        f"{sorted(set(scripts) - pages)}: run scripts/update-manpages"
    )
    for name, target in scripts.items():
        page = (DEBIAN / "man" / f"{name}.1").read_text()
        if page.startswith(".so "):
            assert (DEBIAN / "man" / Path(page.split()[1]).name).exists()
            continue
        th = re.search(r'^\.TH \S+ "1" "[^"]*" "(\S+) (\S+)"', page, re.M)
        assert th and th.group(2) == version(), f"debian/man/{name}.1 is for version {th and th.group(2)}: run scripts/update-manpages"
        if target.startswith("cr_queue.solvers.standin:"):
            continue  # hand-written: the stand-ins take no options
        result = run_entry_point(target, ["--help"], name)
        assert result.returncode == 0, result.stderr
        text = page.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "").replace("\\/", "")
        options = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout.split("Options:", 1)[-1]))
        missing = sorted(o for o in options if o not in text)
        assert not missing, f"debian/man/{name}.1 lacks {missing}: run scripts/update-manpages"
        if name == "crh":
            commands = re.findall(r"^  (\S+)\s", result.stdout.split("Commands:", 1)[1], re.M)
            missing = [c for c in commands if c not in text]
            assert not missing, f"debian/man/crh.1 lacks the commands {missing}: run scripts/update-manpages"


# ---------------------------------------------------------------- systemd unit


def test_worker_unit_runs_drains_and_restarts_as_documented():
    u = unit()
    assert u["Service.User"] == ["crh"] and u["Service.Group"] == ["crh"]
    assert u["Service.KillSignal"] == ["SIGTERM"]
    assert u["Service.KillMode"] == ["mixed"], "SIGTERM must reach only crh_worker, not its solvers"
    assert u["Service.Restart"] == ["on-failure"]
    assert "3" in u["Service.RestartPreventExitStatus"][0].split()
    assert u["Service.EnvironmentFile"] == ["/etc/cr_queue/worker-%i.env"]
    assert "Install.WantedBy" in u
    defaults = unit_defaults()
    stop = systemd_seconds(u["Service.TimeoutStopSec"][0])
    assert stop > DURATION.convert(defaults["CRH_DRAIN_TIMEOUT"], None, None) + 60
    shipped = env_file(DEBIAN / "conf" / "worker-main.env")
    assert stop > DURATION.convert(shipped["CRH_DRAIN_TIMEOUT"], None, None) + 60
    for environment in (defaults, {**defaults, **shipped}):
        argv = exec_start_argv(environment)
        assert argv[0] == "/usr/bin/crh_worker"
        assert "--drain-timeout" in argv and "--quit-when-empty" not in argv
        ctx = dry_parse(["crh_worker", *argv[1:]])
        assert ctx.params["drain_timeout_s"] == DURATION.convert(environment["CRH_DRAIN_TIMEOUT"], None, None)
        assert ctx.params["jobs"] == int(environment["CRH_JOBS"])


def test_worker_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (scripts/test-debian-install runs it in a trixie root)")
    executable = shutil.which("crh_worker") or "/bin/true"
    text = UNIT.read_text().replace("/usr/bin/crh_worker", executable)
    path = tmp_path / "crh-worker@main.service"
    path.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "--man=no", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not problems, "\n".join(problems)


# ---------------------------------------------------------------- SLURM pilot


def run_pilot(tmp_path: Path, env: dict[str, str], args: list[str] = ()) -> tuple[subprocess.CompletedProcess, list[str]]:
    fake = tmp_path / "fake_crh_worker"
    record = tmp_path / "argv.json"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CRH_PILOT_"))}
    result = subprocess.run(
        ["bash", str(PILOT), *args], env={**base, "CRH_WORKER": str(fake), **env},
        capture_output=True, text=True, timeout=60,
    )
    argv = json.loads(record.read_text()) if record.exists() else []
    record.unlink(missing_ok=True)
    return result, argv


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(
    "walltime, seconds",
    [("90", 5400), ("45:10", 2710), ("1:30:00", 5400), ("1-00:00:00", 86400), ("2-3", 183600), ("1-2:30", 95400)],
)
def test_pilot_reads_slurm_time_formats(tmp_path, walltime, seconds):
    result, argv = run_pilot(tmp_path, {"SLURM_CPUS_PER_TASK": "16", "CRH_PILOT_WALLTIME": walltime})
    assert result.returncode == 0, result.stderr
    assert option(argv, "--max-runtime") == f"{seconds - 600}s"
    assert (option(argv, "--jobs"), option(argv, "--threads")) == ("4", "4")
    dry_parse(["crh_worker", *argv])


def test_pilot_uses_slurm_end_time_then_squeue(tmp_path):
    end = int(time.time()) + 3600
    result, argv = run_pilot(tmp_path, {"SLURM_JOB_END_TIME": str(end), "SLURM_CPUS_ON_NODE": "10", "CRH_PILOT_THREADS": "3"})
    assert result.returncode == 0, result.stderr
    assert (option(argv, "--jobs"), option(argv, "--threads")) == ("3", "3")
    assert 2990 <= int(option(argv, "--max-runtime").rstrip("s")) <= 3000
    assert "1 CPU(s) stay idle" in result.stderr
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    squeue.write_text("#!/bin/sh\necho 2:00:00\n")
    squeue.chmod(0o755)
    path = f"{squeue.parent}{os.pathsep}{os.environ['PATH']}"
    result, argv = run_pilot(tmp_path, {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8", "PATH": path}, ["--group", "big"])
    assert result.returncode == 0, result.stderr
    assert option(argv, "--max-runtime") == "6600s" and argv[-2:] == ["--group", "big"]
    assert "--quit-when-empty" in argv and option(argv, "--name") == f"slurm-7-{os.uname().nodename.split('.')[0]}"


def test_pilot_refuses_what_it_cannot_do(tmp_path):
    result, argv = run_pilot(tmp_path, {"SLURM_CPUS_PER_TASK": "4"})
    assert result.returncode == 2 and not argv and "CRH_PILOT_WALLTIME" in result.stderr
    result, argv = run_pilot(tmp_path, {"SLURM_CPUS_PER_TASK": "4", "CRH_PILOT_WALLTIME": "10"})
    assert result.returncode == 2 and not argv and "margin" in result.stderr
    result, argv = run_pilot(tmp_path, {"SLURM_CPUS_PER_TASK": "4", "CRH_PILOT_WALLTIME": "60", "CRH_PILOT_THREADS": "x"})
    assert result.returncode == 2 and not argv


# ---------------------------------------------------------------- the docs


FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.S | re.M)


def doc_blocks(name: str) -> list[tuple[str, str]]:
    return FENCE.findall((REPO / "docs" / name).read_text())


def doc_commands(name: str) -> list[str]:
    return [
        line[2:]
        for lang, body in doc_blocks(name)
        if lang == "console"
        for line in body.splitlines()
        if line.startswith(("$ ", "# "))
    ]


def pilot_sbatch_defaults() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", PILOT.read_text(), re.M))


def install_script() -> str:
    return INSTALL_TEST.read_text()


class DocChecker:
    """One check per kind of command the docs may show; unknown commands fail."""

    def __init__(self, doc: str, tmp_path: Path):
        self.doc = doc
        self.tmp_path = tmp_path
        self.env_files = {"/etc/cr_queue/worker-main.env"}

    def check(self, line: str) -> None:
        argv = shlex.split(line)
        env = {}
        if argv[0] == "export":
            name, _, _ = argv[1].partition("=")
            self.known_variable(name)
            return
        while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
            name, _, value = argv.pop(0).partition("=")
            env[name] = value
        program = argv[0]
        if program == "crh" or program.startswith("crh_"):
            assert program in pyproject()["project"]["scripts"], f"{program} is not a console script"
            dry_parse(argv)
            for name in env:
                self.known_variable(name)
        elif program == "sbatch":
            self.sbatch(argv, env)
        elif program == "systemctl":
            self.systemctl(argv[1:])
        elif program == "journalctl":
            assert argv[1] == "-u" and set(argv[3:]) <= {"-f"}, line
            self.unit_name(argv[2])
        elif program == "cp":
            source, destination = argv[1:]
            assert source in installed_files(), f"{source} is not a file the package installs"
            assert re.fullmatch(r"/etc/cr_queue/worker-[\w-]+\.env", destination), destination
            self.env_files.add(destination)
        elif program == "adduser":
            assert len(argv) == 3 and argv[2] == "crh", line
            assert "adduser alice crh" in install_script()
        elif program == "apt":
            assert argv[1] == "install" and len(argv) == 3, line
            built = {f"cr-queue_{debian_version()}_all.deb", f"cr-queue-web_{debian_version()}_all.deb"}
            assert Path(argv[2]).name in built, f"{line}: the packages built from this tree are {sorted(built)}"
            assert "dpkg-buildpackage -us -uc -b" in install_script() and "install-deb" in install_script()
        elif program == "dpkg-buildpackage":
            assert argv[1:] == ["-us", "-uc", "-b"], line
            assert "dpkg-buildpackage -us -uc -b" in install_script()
        elif program == "scripts/test-debian-install":
            assert os.access(INSTALL_TEST, os.X_OK)
        elif program == "createdb":
            assert argv[-1] == "crqueue" and "createdb" in install_script(), line
        elif program == "psql":
            files = [argv[i + 1] for i, a in enumerate(argv) if a == "-f"]
            assert files, f"{line}: only psql -f with a shipped query is checked"
            for f in files:
                assert f.startswith("/usr/share/cr-queue/sql/") and (REPO / "sql" / Path(f).name).is_file(), f
            assert "psql \"$admin_url\" -v host=" in install_script()
        else:
            pytest.fail(f"docs/{self.doc}: no check for the command {line!r}; add one to tests/test_packaging.py")

    def known_variable(self, name: str) -> None:
        sources = "".join(p.read_text() for p in (REPO / "cr_queue").rglob("*.py")) + PILOT.read_text()
        assert name in sources, f"docs/{self.doc}: {name} is read by neither cr_queue nor the pilot"

    def unit_name(self, name: str) -> str:
        match = re.fullmatch(r"crh-worker@([\w-]*)(\.service)?", name)
        assert match, f"docs/{self.doc}: unknown unit {name}"
        return match.group(1)

    def systemctl(self, args: list[str]) -> None:
        verb = args[0]
        assert verb in {"enable", "start", "stop", "status", "restart", "reset-failed", "kill", "edit", "disable"}, verb
        options = [a for a in args[1:] if a.startswith("--")]
        units = [a for a in args[1:] if not a.startswith("--")]
        assert set(o.split("=")[0] for o in options) <= {"--now", "--kill-whom", "--signal"}, options
        if "--kill-whom=main" in options or verb == "kill":
            assert "--kill-whom=main" in options, "systemctl kill must signal only the worker (--kill-whom=main)"
        for name in units:
            instance = self.unit_name(name)
            if verb == "edit":
                assert instance == "", "edit the template (crh-worker@.service) so every instance gets it"
            else:
                assert f"/etc/cr_queue/worker-{instance}.env" in self.env_files, (
                    f"docs/{self.doc}: crh-worker@{instance} needs /etc/cr_queue/worker-{instance}.env, "
                    "which the package does not ship and the docs do not create before"
                )

    def sbatch(self, argv: list[str], env: dict[str, str]) -> None:
        script_at = next(i for i, a in enumerate(argv) if a.endswith("slurm-pilot.sh"))
        script = argv[script_at]
        assert script in ("scripts/slurm-pilot.sh", "/usr/share/doc/cr-queue/examples/slurm-pilot.sh"), script
        assert (DEBIAN / "cr-queue.examples").read_text().split() == ["scripts/slurm-pilot.sh"]
        options = dict(a[2:].partition("=")[::2] for a in argv[1:script_at])
        assert set(options) <= {"cpus-per-task", "time", "array"}, options
        defaults = pilot_sbatch_defaults()
        cpus = options.get("cpus-per-task", defaults["cpus-per-task"])
        walltime = options.get("time", defaults["time"])
        result, worker = run_pilot(
            self.tmp_path, {**env, "SLURM_CPUS_PER_TASK": cpus, "CRH_PILOT_WALLTIME": walltime}, argv[script_at + 1:]
        )
        assert result.returncode == 0, result.stderr
        jobs, threads = int(option(worker, "--jobs")), int(option(worker, "--threads"))
        assert jobs * threads == int(cpus), f"{' '.join(argv)}: {jobs} x {threads} != {cpus} CPUs"
        h, m, s = (int(x) for x in walltime.split(":"))
        seconds = h * 3600 + m * 60 + s
        max_runtime = DURATION.convert(option(worker, "--max-runtime"), None, None)
        assert seconds - 15 * 60 <= max_runtime < seconds, "--max-runtime must be slightly shorter than the walltime"
        dry_parse(["crh_worker", *worker])


@pytest.mark.parametrize("doc", DOCS)
def test_doc_shell_commands_are_checked(doc, tmp_path):
    commands = doc_commands(doc)
    assert commands, f"docs/{doc} shows no commands in ```console blocks"
    checker = DocChecker(doc, tmp_path)
    for line in commands:
        checker.check(line)
    for lang, body in doc_blocks(doc):
        assert lang, f"docs/{doc}: a fenced block without a language; mark it console, toml, ini, sh or text"
        if lang == "console":
            stray = [l for l in body.splitlines() if l.strip() and not l.startswith(("$ ", "# "))]
            assert not stray, f"docs/{doc}: console lines without a '$ ' or '# ' prompt: {stray}"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_config_snippets_are_valid(doc, tmp_path):
    for i, (lang, body) in enumerate(doc_blocks(doc)):
        where = f"docs/{doc}, block {i + 1} ({lang})"
        if lang == "toml":
            path = tmp_path / f"config{i}.toml"
            path.write_text(body)
            path.chmod(0o600)
            settings = crh_config.load(env={"CRH_CONFIG": str(path), "HOME": str(tmp_path), "CRH_SYSTEM_CONFIG": "/nonexistent"})
            assert settings.database_url and settings.database_source == f"config:{path}", where
        elif lang == "ini" and "[general]" in body:
            home = tmp_path / f"home{i}"
            home.mkdir()
            (home / ".crhydra.cfg").write_text(body)
            (home / ".crhydra.cfg").chmod(0o600)
            empty = home / "user.toml"
            empty.write_text("")
            settings = crh_config.load(env={"HOME": str(home), "CRH_SYSTEM_CONFIG": "/nonexistent", "CRH_CONFIG": str(empty)})
            assert settings.database_source.startswith("legacy:"), where
        elif lang == "ini" and "[program:" in body:
            parser = configparser.ConfigParser(interpolation=None)
            parser.read_string(body)
            program = parser[parser.sections()[0]]
            argv = shlex.split(program["command"].replace("%(host_node_name)s", "node01"))
            assert argv[0] == "/usr/bin/crh_worker", where
            ctx = dry_parse(["crh_worker", *argv[1:]])
            assert program["stopsignal"] == "TERM" and program.getboolean("stopasgroup") is False, where
            assert "3" in program["exitcodes"].split(","), f"{where}: exit status 3 (broken node) must not restart"
            assert program["user"] == "crh", where
            assert int(program["stopwaitsecs"]) > ctx.params["drain_timeout_s"], f"{where}: stopwaitsecs <= drain"
        elif lang == "ini" and "[Service]" in body:
            parser = configparser.ConfigParser(interpolation=None)
            parser.optionxform = str
            parser.read_string(body)
            assert set(parser["Service"]) <= set(k.split(".", 1)[1] for k in unit() if k.startswith("Service.")), where
            assert systemd_seconds(parser["Service"]["TimeoutStopSec"]) > 0, where
        elif lang == "sh":
            values = env_file_text(body)
            assert values.keys() <= env_file(DEBIAN / "conf" / "worker-main.env").keys(), where
            argv = exec_start_argv({**unit_defaults(), **values})
            dry_parse(["crh_worker", *argv[1:]])
        elif lang not in ("console", "text"):
            pytest.fail(f"{where}: no check for ```{lang} blocks; add one to tests/test_packaging.py")


def env_file_text(body: str) -> dict[str, str]:
    """As systemd reads an EnvironmentFile: only whole lines are comments."""
    result = {}
    for line in body.splitlines():
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()
    return result


def test_deployment_doc_states_the_units_numbers():
    """The prose repeats a few numbers of the unit and the pilot; keep them true."""
    text = (REPO / "docs" / "deployment.md").read_text()
    u = unit()
    assert f"TimeoutStopSec={u['Service.TimeoutStopSec'][0]}" in text
    assert f"CRH_DRAIN_TIMEOUT={env_file(DEBIAN / 'conf' / 'worker-main.env')['CRH_DRAIN_TIMEOUT']}" in text
    assert "RestartPreventExitStatus=3" in text and "KillMode=mixed" in text
    pilot = PILOT.read_text()
    assert re.search(r"CRH_PILOT_MARGIN:-600", pilot) and "(default 600 s)" in text
    assert re.search(r"CRH_PILOT_THREADS:-4", pilot) and "(default 4)" in text
    assert "--drain-timeout 20s" in pilot and "`--drain-timeout 20s`" in text


def test_install_script_reports_one_verdict_line():
    text = install_script()
    subprocess.run(["bash", "-n", str(INSTALL_TEST)], check=True)
    assert os.access(INSTALL_TEST, os.X_OK) and os.access(PILOT, os.X_OK)
    assert 'echo "debian install test: PASS"' in text.splitlines()[-1]
    assert 'echo "debian install test: FAIL: $*"' in text
    for step in ("crh --help", "crh --version", "crh db upgrade", "crh_add", "crh_wait_retrieve", "systemd-analyze"):
        assert step in text, f"scripts/test-debian-install no longer runs {step}"
    mode = INSTALL_TEST.stat().st_mode
    assert mode & stat.S_IXUSR


def _inline_spans(doc: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", (REPO / "docs" / doc).read_text(), flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def _legacy_password_needs_chmod_600(tmp_path: Path) -> bool:
    home = tmp_path / "legacy-home"
    home.mkdir()
    legacy = home / ".crhydra.cfg"
    legacy.write_text("[general]\ndb_credentials = postgresql://alice:secret@db/crqueue\n")
    empty = home / "user.toml"
    empty.write_text("")
    env = {"HOME": str(home), "CRH_SYSTEM_CONFIG": "/nonexistent", "CRH_CONFIG": str(empty)}
    legacy.chmod(0o644)
    with pytest.raises(crh_config.ConfigError, match="chmod 600"):
        crh_config.load(env=env)
    legacy.chmod(0o600)
    return crh_config.load(env=env).database_source.startswith("legacy:")


# cr_hydra's commands that cr_queue does not have (named in the migration guide).
CR_HYDRA_ONLY = {"crh_wait_to_finish"}

# Inline commands of other tools, and where each is exercised.
INLINE_ELSEWHERE = {
    "apt-get build-dep ./": lambda tmp: "build-dep" in install_script(),
    "man crh_worker": lambda tmp: "in_root man -P cat" in install_script(),
    "man crh_standin_crmod": lambda tmp: "in_root man -P cat" in install_script() and "crh_standin_crmod" in install_script(),
    "apt purge cr-queue": lambda tmp: "apt-get -q -y purge cr-queue" in install_script(),
    "chmod 600 ~/.crhydra.cfg": _legacy_password_needs_chmod_600,
}


@pytest.mark.parametrize("doc", DOCS)
def test_doc_inline_commands_exist(doc, tmp_path):
    """`crh ...` in the prose names real commands and options; other tools' commands are exercised."""
    console = " ".join(doc_commands(doc))
    for span in _inline_spans(doc):
        words = span.split()
        if not words or not re.fullmatch(r"crh|crh_\w+|sbatch|systemctl|apt|apt-get|man|chmod|psql|createdb|dpkg\S*", words[0]):
            continue
        if len(words) == 1 and words[0] not in pyproject()["project"]["scripts"]:
            continue  # a name (a role such as crh_user, a program), not a command line
        if words[0] in CR_HYDRA_ONLY:
            assert doc == "migrating-from-cr_hydra.md", f"docs/{doc}: `{span}` is cr_hydra's, not cr_queue's"
        elif pyproject()["project"]["scripts"].get(words[0], "").startswith("cr_queue.solvers.standin:"):
            assert len(words) == 1, f"docs/{doc}: `{span}`: the stand-in solvers take no arguments"
        elif words[0] in ("crh",) or words[0].startswith("crh_"):
            command = command_for(words[0])
            for word in words[1:]:
                if word in ("...", "|") or not re.fullmatch(r"[\w-]+", word.lstrip("-")):
                    break
                if word.startswith("-"):
                    names = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                    assert word in names, f"docs/{doc}: `{span}`: {words[0]} has no option {word}"
                elif isinstance(command, click.Group):
                    assert word in command.commands, f"docs/{doc}: `{span}`: no command {word}"
                    command = command.commands[word]
                else:
                    break  # an argument
        elif words[0] == "sbatch":
            assert words[1].endswith("slurm-pilot.sh"), span
            dry_parse(["crh_worker", *words[2:]])
        elif words[0] == "systemctl" and len(words) == 2:
            assert f"systemctl {words[1]} " in console, f"docs/{doc}: `{span}` is not shown in a console block"
        else:
            check = INLINE_ELSEWHERE.get(span)
            assert check is not None, f"docs/{doc}: no check for the inline command `{span}`; add one to tests/test_packaging.py"
            assert check(tmp_path), f"docs/{doc}: `{span}` is no longer exercised"


def test_every_package_of_the_tree_is_installed():
    """A non-editable install (pip install ., the Debian package) ships only the packages
    pyproject.toml lists: one left out (cr_queue.tomodir.archive, cr_queue.db.embedded were)
    breaks every command of an installed cr_queue while the editable test venv works."""
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "cr_queue").rglob("__init__.py")
    }
    assert in_tree - listed == set()
