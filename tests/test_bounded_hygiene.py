"""The session check of tests/hygiene.py sees what a test leaves on the host, and puts back what it can."""

from __future__ import annotations

import os
import stat
import tempfile
import uuid
from pathlib import Path

from . import hygiene


def test_a_leftover_in_tmp_a_changed_mode_and_a_new_account_are_reported(tmp_path: Path, monkeypatch) -> None:
    # Alone on the machine (another session running at the same time would leave modes to the last one).
    monkeypatch.setattr(hygiene, "_other_live_sessions", lambda: [])
    outer = tempfile.tempdir
    state = hygiene.start_session()
    try:
        # Everything temporary now goes to the session's own directory.
        assert tempfile.gettempdir() == str(state.session_dir)
        assert os.environ["TMPDIR"] == str(state.session_dir)
        inside = Path(tempfile.mkdtemp(prefix="crh-test-inside-"))
        leak = Path("/tmp") / f"crh-test-leak-{uuid.uuid4().hex[:8]}"
        leak.mkdir()
        watched = tmp_path / "watched"
        watched.mkdir(mode=0o700)
        watched.chmod(0o700)
        state.modes[watched] = 0o700
        watched.chmod(0o711)
        passwd = Path("/etc/passwd")
        state.accounts[passwd] = [line for line in passwd.read_text().splitlines() if not line.startswith("root:")]
        problems = hygiene.finish_session(state)
    finally:
        tempfile.tempdir = outer
        leak.rmdir()
    assert f"{leak} was left behind" in problems
    assert f"{watched} mode 0711, was 0700 (put back)" in problems
    assert stat.S_IMODE(watched.stat().st_mode) == 0o700
    assert "/etc/passwd gained 'root'" in problems
    assert not inside.exists() and not state.session_dir.exists()
    assert tempfile.gettempdir() == outer


def test_a_clean_session_reports_nothing() -> None:
    outer = tempfile.tempdir
    state = hygiene.start_session()
    try:
        Path(tempfile.mkdtemp(prefix="crh-test-inside-"), "file").write_text("x")
        problems = hygiene.finish_session(state)
    finally:
        tempfile.tempdir = outer
    # Other sessions on a shared machine may add their own entries meanwhile: only ours count here.
    assert [p for p in problems if str(state.session_dir) in p or "mode" in p or "etc" in p] == []


def test_traverse_grants_are_taken_back(tmp_path: Path) -> None:
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        import pytest

        pytest.skip("no nobody account")
    private = tmp_path / "private"
    inner = private / "inner" / "file"
    inner.parent.mkdir(parents=True)
    inner.write_text("x")
    private.chmod(0o700)
    (private / "inner").chmod(0o700)
    with hygiene.traverse_grants() as grant:
        grant(nobody, inner)
        assert stat.S_IMODE(private.stat().st_mode) & stat.S_IXOTH
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / "inner").stat().st_mode) == 0o700
