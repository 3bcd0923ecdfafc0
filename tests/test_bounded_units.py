"""crh_cleanup runs from a systemd timer shipped with the package: the units are installed and their command parses."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cr_queue.cli.cleanup import cleanup_command

from .conftest import REPO

DEBIAN = REPO / "debian"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read_string((DEBIAN / name).read_text())
    return parser


def _installed() -> dict[str, str]:
    lines = [line.split() for line in (DEBIAN / "cr-queue.install").read_text().splitlines() if line.strip()]
    return {Path(source).name: destination for source, destination in lines}


def test_the_units_and_their_settings_are_installed_and_not_enabled_by_the_package():
    installed = _installed()
    assert installed["crh-cleanup.service"] == installed["crh-cleanup.timer"] == "usr/lib/systemd/system/"
    assert installed["cleanup.env"] == "etc/cr_queue/"
    assert "dh_installsystemd --no-enable --no-start" in (DEBIAN / "rules").read_text()
    timer = _unit("crh-cleanup.timer")
    assert timer["Timer"]["OnCalendar"] == "daily" and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_the_service_command_parses_with_the_shipped_settings():
    service = _unit("crh-cleanup.service")["Service"]
    assert service["Type"] == "oneshot" and service["User"] == "crh"
    assert service["EnvironmentFile"] == "-/etc/cr_queue/cleanup.env"
    env = dict(line.split("=", 1) for line in (DEBIAN / "conf" / "cleanup.env").read_text().splitlines()
               if line and not line.startswith("#"))
    argv = shlex.split(service["ExecStart"].replace("$CRH_CLEANUP_ARGS", env["CRH_CLEANUP_ARGS"]))
    assert argv[0] == "/usr/bin/crh_cleanup" and "--yes" in argv
    ctx = cleanup_command.make_context("crh_cleanup", argv[1:])
    # Never crh_missing from a timer: it judges .crh files of the computer it runs on.
    assert set(ctx.params["kinds"]) == {"retrieved", "expired", "stuck_registering", "blobs"}
    example = "--keep-retrieved 7d"
    assert f"#CRH_CLEANUP_ARGS={example}" in (DEBIAN / "conf" / "cleanup.env").read_text()
    assert cleanup_command.make_context("crh_cleanup", argv[1:] + example.split()).params["keep_retrieved_s"] == 7 * 86400


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path):
    for name in ("crh-cleanup.service", "crh-cleanup.timer"):
        text = (DEBIAN / name).read_text().replace("/usr/bin/crh_cleanup", shutil.which("true") or "/bin/true")
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "crh-cleanup.service"), str(tmp_path / "crh-cleanup.timer")],
        capture_output=True, text=True, timeout=60,
    )
    # Only the man: documentation link may be unknown on a build machine.
    complaints = [line for line in proc.stderr.splitlines() if "man crh_cleanup" not in line and line.strip()]
    assert complaints == [], proc.stderr
