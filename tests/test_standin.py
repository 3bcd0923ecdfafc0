"""The stand-in solvers, run as real processes in exe/ like CRMod and CRTomo."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cr_queue
from cr_queue.tomodir import synth
from cr_queue.tomodir.discover import Done, Tomodir, classify

PACKAGE_ROOT = Path(cr_queue.__file__).resolve().parent.parent
PID_LINE = re.compile(r"^\s*CRTomo PID\s+(\d+)\s+exited abnormally\s*$")


def solver_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRH_STANDIN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start(solver: str, tomodir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cr_queue.solvers.standin", solver],
        cwd=tomodir / "exe",
        env=solver_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(solver: str, tomodir: Path, **env: str) -> tuple[subprocess.Popen, str, str]:
    proc = start(solver, tomodir, **env)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def settings(tomodir: Path, text: str) -> None:
    (tomodir / "exe/standin.cfg").write_text(text)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def counted_lines(path: Path) -> tuple[int, int]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return int(lines[0].split()[0]), len(lines) - 1


def last_line(path: Path) -> str:
    return [line for line in path.read_text().splitlines() if line.strip()][-1]


@pytest.fixture
def mod_dir(tmp_path: Path) -> Path:
    return synth.make_tomodir(tmp_path / "td_mod", "mod", nx=6, nz=3)


@pytest.fixture
def inv_dir(tmp_path: Path) -> Path:
    return synth.make_tomodir(tmp_path / "td_inv", "inv", nx=6, nz=3)


def test_crmod_writes_volt_dat_and_leaves_its_pid_file(mod_dir: Path) -> None:
    proc, out, _ = run("crmod", mod_dir, OMP_NUM_THREADS="3")
    assert proc.returncode == 0
    assert "OpenMP max threads: 3" in out
    count, lines = counted_lines(mod_dir / "mod/volt.dat")
    assert count == lines == counted_lines(mod_dir / "config/config.dat")[0]
    assert int((mod_dir / "exe/crmod.pid").read_text()) == proc.pid
    assert not (mod_dir / "exe/error.dat").exists()
    assert isinstance(classify(mod_dir), Done)


def test_crmod_output_is_deterministic(tmp_path: Path) -> None:
    a = synth.make_tomodir(tmp_path / "a", "mod", seed=1)
    b = synth.make_tomodir(tmp_path / "b", "mod", seed=1)
    run("crmod", a)
    run("crmod", b)
    assert (a / "mod/volt.dat").read_bytes() == (b / "mod/volt.dat").read_bytes()


def test_crmod_potentials_and_sensitivities(mod_dir: Path) -> None:
    cfg = mod_dir / "exe/crmod.cfg"
    lines = cfg.read_text().splitlines()
    lines[5] = "T                ! potentials ?"
    lines[9] = "T                ! sensitivities ?"
    cfg.write_text("\n".join(lines) + "\n")
    proc, _, _ = run("crmod", mod_dir)
    assert proc.returncode == 0
    n_configs = counted_lines(mod_dir / "config/config.dat")[0]
    pots = sorted((mod_dir / "mod/pot").iterdir())
    sens = sorted((mod_dir / "mod/sens").iterdir())
    assert [p.name for p in pots] == [f"pot{i:04d}.dat" for i in range(1, n_configs + 1)]
    assert [p.name for p in sens] == [f"sens{i:04d}.dat" for i in range(1, n_configs + 1)]
    assert counted_lines(pots[0]) == (7 * 4, 7 * 4)
    assert counted_lines(sens[0]) == (6 * 3, 6 * 3)


def test_crtomo_writes_an_inversion(inv_dir: Path) -> None:
    proc, out, _ = run("crtomo", inv_dir, OMP_NUM_THREADS="2")
    assert proc.returncode == 0
    assert "OpenMP max threads: 2" in out
    inv = inv_dir / "inv"
    names = {p.name for p in inv.iterdir()}
    for it in (1, 2, 3):
        assert {f"rho{it:02d}.mag", f"rho{it:02d}.pha", f"rho{it:02d}.sig", f"volt{it:02d}.dat"} <= names
    assert {"run.ctr", "inv.ctr"} <= names
    assert "rho04.mag" not in names
    assert last_line(inv / "inv.ctr").startswith("***finished***")
    assert "OpenMP max threads: 2" in (inv / "run.ctr").read_text()
    assert (inv_dir / "exe/inv.lastmod").read_text().strip() == "../inv/rho03.mag"
    assert counted_lines(inv / "rho03.mag") == (18, 18)
    assert counted_lines(inv / "volt03.dat")[0] == counted_lines(inv_dir / "mod/volt.dat")[0]
    assert not (inv_dir / "exe/crtomo.pid").exists()
    assert isinstance(classify(inv_dir), Done)


def test_crtomo_iterations_setting(inv_dir: Path) -> None:
    settings(inv_dir, "# five iterations\niterations = 5\n")
    run("crtomo", inv_dir)
    assert (inv_dir / "inv/rho05.mag").is_file()
    assert (inv_dir / "exe/inv.lastmod").read_text().strip() == "../inv/rho05.mag"


def test_modelling_then_inversion_completes_a_both_dir(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", "both")
    job = classify(td)
    assert isinstance(job, Tomodir) and job.steps == ("mod", "inv")
    for step in job.steps:
        proc, _, _ = run("crmod" if step == "mod" else "crtomo", td)
        assert proc.returncode == 0
    assert isinstance(classify(td), Done)


def test_console_script_when_installed(inv_dir: Path) -> None:
    script = shutil.which("crh_standin_crtomo")
    if script is None:
        pytest.skip("crh_standin_crtomo is not installed (pip install -e .)")
    proc = subprocess.run([script], cwd=inv_dir / "exe", env=solver_env(), capture_output=True, timeout=120)
    assert proc.returncode == 0
    assert isinstance(classify(inv_dir), Done)


def test_crtomo_missing_input_fails_like_the_real_one(inv_dir: Path) -> None:
    (inv_dir / "grid/elec.dat").unlink()
    proc, _, err = run("crtomo", inv_dir)
    assert proc.returncode == 0
    assert "STOP -1" in err
    lines = (inv_dir / "exe/error.dat").read_text().splitlines()
    match = PID_LINE.match(lines[0])
    assert match and int(match.group(1)) == proc.pid
    assert lines[1][:80].strip() == "../grid/elec.dat"
    assert lines[1][80:] == "  12"
    assert "../grid/elec.dat" in lines[2]
    assert not (inv_dir / "inv/inv.ctr").exists()
    assert (inv_dir / "exe/crtomo.pid").exists()


def test_crmod_missing_input_fails_like_the_real_one(mod_dir: Path) -> None:
    (mod_dir / "rho/rho.dat").unlink()
    proc, _, err = run("crmod", mod_dir)
    assert proc.returncode == 0
    assert "STOP -1" in err
    lines = (mod_dir / "exe/error.dat").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0][:80].strip() == "../rho/rho.dat" and lines[0][80:] == "  12"
    assert "../rho/rho.dat" in lines[1]
    assert not (mod_dir / "mod/volt.dat").exists()


def test_missing_cfg_is_an_error_dat_too(inv_dir: Path) -> None:
    (inv_dir / "exe/crtomo.cfg").unlink()
    proc, _, _ = run("crtomo", inv_dir)
    assert proc.returncode == 0
    assert (inv_dir / "exe/error.dat").read_text().splitlines()[1][:80].strip() == "crtomo.cfg"


@pytest.mark.parametrize("solver", ["crmod", "crtomo"])
def test_fail_error_dat(tmp_path: Path, solver: str) -> None:
    td = synth.make_tomodir(tmp_path / "td", "mod" if solver == "crmod" else "inv")
    settings(td, "fail = error_dat\n")
    proc, _, err = run(solver, td)
    assert proc.returncode == 0
    assert "STOP -1" in err
    lines = (td / "exe/error.dat").read_text().splitlines()
    if solver == "crtomo":
        assert int(PID_LINE.match(lines.pop(0)).group(1)) == proc.pid
    assert len(lines) == 2
    assert len(lines[0]) == 84 and lines[0][80:].strip().isdigit()
    assert lines[1].strip()
    assert not (td / "mod/volt.dat").exists() if solver == "crmod" else not (td / "inv/inv.ctr").exists()


@pytest.mark.parametrize("solver", ["crmod", "crtomo"])
def test_fail_exit(tmp_path: Path, solver: str) -> None:
    td = synth.make_tomodir(tmp_path / "td", "both")
    proc, _, _ = run(solver, td, CRH_STANDIN_FAIL="exit")
    assert proc.returncode == 3
    assert not (td / "exe/error.dat").exists()
    assert not (td / "mod/volt.dat").exists() and not any((td / "inv").iterdir())


def test_fail_signal_crtomo_leaves_partial_inversion(inv_dir: Path) -> None:
    settings(inv_dir, "fail = signal\n")
    proc, _, _ = run("crtomo", inv_dir)
    assert proc.returncode == -signal.SIGKILL
    assert (inv_dir / "exe/crtomo.pid").exists()
    assert not (inv_dir / "exe/error.dat").exists()
    assert (inv_dir / "inv/rho01.mag").exists()
    assert not last_line(inv_dir / "inv/inv.ctr").startswith("***finished***")
    job = classify(inv_dir)
    assert isinstance(job, Tomodir) and job.needs_inv


def test_fail_signal_crmod_leaves_truncated_volt_dat(mod_dir: Path) -> None:
    proc, _, _ = run("crmod", mod_dir, CRH_STANDIN_FAIL="signal")
    assert proc.returncode == -signal.SIGKILL
    count, lines = counted_lines(mod_dir / "mod/volt.dat")
    assert 0 < lines < count


@pytest.mark.parametrize("solver", ["crmod", "crtomo"])
def test_fail_missing_output_writes_nothing(tmp_path: Path, solver: str) -> None:
    td = synth.make_tomodir(tmp_path / "td", "mod" if solver == "crmod" else "inv")
    settings(td, "fail = missing_output\n")
    before = snapshot(td)
    proc, _, _ = run(solver, td)
    assert proc.returncode == 0
    assert snapshot(td) == before
    assert isinstance(classify(td), Tomodir)


def test_fail_partial_crtomo(inv_dir: Path) -> None:
    settings(inv_dir, "fail = partial\n")
    proc, _, _ = run("crtomo", inv_dir)
    assert proc.returncode == 0
    assert not (inv_dir / "exe/error.dat").exists()
    assert (inv_dir / "inv/rho01.mag").exists() and not (inv_dir / "inv/rho03.mag").exists()
    assert not last_line(inv_dir / "inv/inv.ctr").startswith("***finished***")
    assert classify(inv_dir) == Tomodir(inv_dir, needs_mod=False, needs_inv=True)


def test_fail_partial_crmod(mod_dir: Path) -> None:
    settings(mod_dir, "fail = partial\n")
    proc, _, _ = run("crmod", mod_dir)
    assert proc.returncode == 0
    count, lines = counted_lines(mod_dir / "mod/volt.dat")
    assert lines < count


@pytest.mark.parametrize("solver", ["crmod", "crtomo"])
def test_fail_hang_is_killed_by_a_timeout(tmp_path: Path, solver: str) -> None:
    td = synth.make_tomodir(tmp_path / "td", "mod" if solver == "crmod" else "inv")
    settings(td, "fail = hang\n")
    proc = start(solver, td)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
        assert (td / "exe" / f"{solver}.pid").exists()
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_sleep_delays_the_work(inv_dir: Path) -> None:
    began = time.monotonic()
    proc, _, _ = run("crtomo", inv_dir, CRH_STANDIN_SLEEP="0.3")
    assert proc.returncode == 0
    assert time.monotonic() - began >= 0.3


def test_standin_cfg_wins_over_the_environment(inv_dir: Path) -> None:
    settings(inv_dir, "fail = none\n")
    proc, _, _ = run("crtomo", inv_dir, CRH_STANDIN_FAIL="exit")
    assert proc.returncode == 0
    assert isinstance(classify(inv_dir), Done)


def test_solver_specific_failure_hits_only_that_step(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", "both")
    settings(td, "fail_crtomo = error_dat\n")
    assert run("crmod", td)[0].returncode == 0
    assert (td / "mod/volt.dat").exists()
    assert run("crtomo", td)[0].returncode == 0
    assert PID_LINE.match((td / "exe/error.dat").read_text().splitlines()[0])


def test_bad_settings_exit_2_with_a_message(inv_dir: Path) -> None:
    settings(inv_dir, "fail = sometimes\n")
    proc, _, err = run("crtomo", inv_dir)
    assert proc.returncode == 2
    assert "sometimes" in err and "standin.cfg" in err
    assert not (inv_dir / "exe/crtomo.pid").exists()


def test_usage_without_a_solver_name(inv_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cr_queue.solvers.standin"], cwd=inv_dir / "exe", env=solver_env(), capture_output=True
    )
    assert proc.returncode == 2


def test_mark_log_counts_runs(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    a, b = synth.make_tree(tmp_path / "tree", n_inv=1, n_both=1)
    run("crtomo", a, CRH_STANDIN_MARK=str(marks))
    run("crmod", b, CRH_STANDIN_MARK=str(marks))
    run("crtomo", b, CRH_STANDIN_MARK=str(marks), CRH_STANDIN_FAIL="exit")
    entries = [line.split(" ", 2) for line in (marks / "runs.log").read_text().splitlines()]
    assert [(solver, Path(cwd)) for _, solver, cwd in entries] == [
        ("crtomo", a / "exe"),
        ("crmod", b / "exe"),
        ("crtomo", b / "exe"),
    ]
    assert all(pid.isdigit() for pid, _, _ in entries)



@pytest.mark.parametrize(
    "name,solver",
    [("td_mod_minimal", "crmod"), ("td_inv_tools_postproc", "crtomo"), ("sipdir_complex/invmod/01_0.010", "crtomo")],
)
def test_real_examples_are_solved(examples_dir: Path, name: str, solver: str) -> None:
    td = examples_dir / name
    assert isinstance(classify(td), Tomodir)
    proc, _, err = run(solver, td)
    assert proc.returncode == 0, err
    assert not (td / "exe/error.dat").exists()
    assert isinstance(classify(td), Done)


# ------------------------------------------------ behaviours of the fault run


@pytest.mark.parametrize("code", ["1", "77", "255"])
def test_fail_exit_with_a_chosen_status(mod_dir: Path, code: str) -> None:
    settings(mod_dir, f"fail = exit\nexit_code = {code}\n")
    proc, _, err = run("crmod", mod_dir)
    assert proc.returncode == int(code) and f"status {code}" in err
    assert not (mod_dir / "mod/volt.dat").exists() and not (mod_dir / "exe/error.dat").exists()


@pytest.mark.parametrize("name,sig", [("TERM", signal.SIGTERM), ("SIGSEGV", signal.SIGSEGV), ("abrt", signal.SIGABRT), ("INT", signal.SIGINT)])
def test_fail_signal_with_a_chosen_signal(inv_dir: Path, name: str, sig: int) -> None:
    settings(inv_dir, f"fail = signal\nsignal = {name}\n")
    proc, _, _ = run("crtomo", inv_dir)
    assert proc.returncode == -sig
    assert isinstance(classify(inv_dir), Tomodir), "a partial inversion, not a result"


@pytest.mark.parametrize(
    "text,problem",
    [("exit_code = 0", "exit_code must be 1-255"), ("signal = NOPE", "unknown signal"),
     ("large = -1", "large must be"), ("tag = a/b", "tag 'a/b'"), ("large = lots", "bad stand-in setting")],
)
def test_bad_new_settings_exit_2_naming_the_setting(mod_dir: Path, text: str, problem: str) -> None:
    settings(mod_dir, text + "\n")
    proc, _, err = run("crmod", mod_dir)
    assert proc.returncode == 2 and problem in err and "standin.cfg" in err


@pytest.mark.parametrize("solver,where", [("crmod", "mod"), ("crtomo", "inv")])
def test_large_output_is_deterministic_and_incompressible(tmp_path: Path, solver: str, where: str) -> None:
    import zlib

    tds = [synth.make_tomodir(tmp_path / f"td{i}", "mod" if solver == "crmod" else "inv", seed=i) for i in range(2)]
    for td in tds:
        settings(td, "large = 3000000\n")
        proc, _, _ = run(solver, td)
        assert proc.returncode == 0
        assert isinstance(classify(td), Done)
    first, second = ((td / where / "large.bin").read_bytes() for td in tds)
    assert len(first) == 3_000_000 and first == second
    assert len(zlib.compress(first[:100_000])) > 99_000


def test_runs_record_what_they_wrote_by_digest(tmp_path: Path) -> None:
    import hashlib
    import json

    marks = tmp_path / "marks"
    marks.mkdir()
    both = synth.make_tomodir(tmp_path / "both", "both")
    settings(both, "tag = td-both\nlarge_crtomo = 1000\n")
    bad = synth.make_tomodir(tmp_path / "bad", "mod")
    settings(bad, "tag = td-bad\nfail = error_dat\n")
    killed = synth.make_tomodir(tmp_path / "killed", "inv")
    settings(killed, "tag = td-killed\nfail = signal\n")
    empty = synth.make_tomodir(tmp_path / "empty", "mod")
    settings(empty, "tag = td-empty\nfail = missing_output\n")
    for solver, td in (("crmod", both), ("crtomo", both), ("crmod", bad), ("crtomo", killed), ("crmod", empty)):
        run(solver, td, CRH_STANDIN_MARK=str(marks))
    records = {}
    for path in (marks / "written").iterdir():
        entry = json.loads(path.read_text())
        assert path.name == f"{entry['tag']}-{entry['solver']}-{entry['pid']}.json"
        records[(entry["tag"], entry["solver"])] = entry
    assert set(records) == {("td-both", "crmod"), ("td-both", "crtomo"), ("td-bad", "crmod"), ("td-empty", "crmod")}, (
        "a killed run records nothing"
    )
    for (tag, _solver), entry in records.items():
        td = tmp_path / tag[3:]
        for rel, digest in entry["files"].items():
            assert hashlib.sha256((td / rel).read_bytes()).hexdigest() == digest, rel
    assert "mod/volt.dat" in records[("td-both", "crmod")]["files"]
    assert {"inv/large.bin", "inv/inv.ctr", "exe/inv.lastmod"} <= set(records[("td-both", "crtomo")]["files"])
    assert records[("td-bad", "crmod")]["outcome"] == "error_dat"
    assert set(records[("td-bad", "crmod")]["files"]) == {"exe/error.dat"}
    assert records[("td-empty", "crmod")] == {**records[("td-empty", "crmod")], "outcome": "missing_output", "files": {}}
    assert not list((marks / "written").glob("*.tmp"))
