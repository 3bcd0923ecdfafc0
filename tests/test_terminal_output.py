"""Progress bars and colour only on a terminal, and never colour with NO_COLOR."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from cr_queue.tomodir import synth

from .conftest import run, script


def _on_tty(argv, env, cwd):
    """Run under a pseudo-terminal (util-linux script) and return what the terminal showed."""
    if not shutil.which("script"):
        pytest.skip("util-linux script(1) is needed for a pseudo-terminal")
    command = " ".join(shlex.quote(a) for a in argv)
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout


def test_progress_bars_and_colour_follow_the_terminal(tmp_path, cli_env):
    synth.make_tree(tmp_path, n_mod=3)
    colour_env = {k: v for k, v in cli_env.items() if k != "NO_COLOR"}
    code, shown = _on_tty([script("crh_add")], colour_env, tmp_path)
    assert code == 0 and "adding" in shown and "\x1b[" in shown
    run([script("crh_worker"), "-q"], cli_env)
    code, shown = _on_tty([script("crh_retrieve")], cli_env, tmp_path)
    assert code == 0 and "retrieving" in shown
    # NO_COLOR (set in cli_env): no colour codes, only the bar's own cursor control.
    assert "\x1b[32m" not in shown and "\x1b[0m" not in shown
    # Not a terminal: plain lines, no bar.
    synth.make_tree(tmp_path / "more", n_mod=1, seed=5)
    piped = run([script("crh_add")], colour_env, cwd=tmp_path / "more").stdout
    assert "queued job" in piped and "\x1b[" not in piped and "adding" not in piped
