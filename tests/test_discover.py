"""Discovery of tomodirs that need CRMod, CRTomo or both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cr_queue.tomodir import synth
from cr_queue.tomodir.discover import Discovery, Done, Incomplete, Tomodir, classify, discover



FINISHED = "header\nIT 1 2.0\n***finished***\n"


def finish_inversion(td: Path, *trailer: str) -> None:
    (td / "inv/inv.ctr").write_text(FINISHED + "".join(trailer))


def state(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry with size and mtime: discovery must leave all of it alone."""
    entries = {}
    for d, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(d, name))
            entries[os.path.relpath(os.path.join(d, name), path)] = (st.st_size, st.st_mtime_ns)
    return entries


@pytest.mark.parametrize(
    "kind,needs_mod,needs_inv,sim_type,steps",
    [
        ("mod", True, False, "mod", ("mod",)),
        ("inv", False, True, "inv", ("inv",)),
        ("both", True, True, "inv", ("mod", "inv")),
    ],
)
def test_generated_kinds(
    tmp_path: Path, kind: str, needs_mod: bool, needs_inv: bool, sim_type: str, steps: tuple
) -> None:
    td = synth.make_tomodir(tmp_path / "td", kind)
    job = classify(td)
    assert job == Tomodir(td, needs_mod=needs_mod, needs_inv=needs_inv)
    assert job.sim_type == sim_type
    assert job.steps == steps


@pytest.mark.parametrize(
    "kind,path,text,expected",
    [
        pytest.param("inv", "inv/inv.ctr", FINISHED + "\n   \n", "done", id="finished_inversion_is_done"),
        pytest.param("inv", "inv/inv.ctr", "header\nIT 1 2.0\n", "inv", id="unfinished_inversion_needs_inversion"),
        pytest.param("inv", "inv/inv.ctr", FINISHED + "IT 2 1.0\n", "inv", id="finished_line_must_be_last"),
        pytest.param("mod", "mod/volt.dat", "0\n", "done", id="modelled_dir_without_crtomo_cfg_is_done"),
        pytest.param("both", "mod/volt.dat", "0\n", "inv", id="both_after_modelling_needs_only_inversion"),
    ],
)
def test_classify_after_a_solver_wrote(tmp_path: Path, kind: str, path: str, text: str, expected: str) -> None:
    """A solver's output file decides what is left: "done" (nothing) or "inv" (only the inversion)."""
    td = synth.make_tomodir(tmp_path / "td", kind)
    (td / path).write_text(text)
    want = Done(td) if expected == "done" else Tomodir(td, needs_mod=False, needs_inv=True)
    assert classify(td) == want


def test_inversion_ready_dir_needs_no_modelling_inputs(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", "inv")
    (td / "rho/rho.dat").unlink()
    (td / "config/config.dat").unlink()
    assert classify(td) == Tomodir(td, needs_mod=False, needs_inv=True)


@pytest.mark.parametrize(
    "kind,remove,missing",
    [
        ("mod", ["rho/rho.dat"], ("rho/rho.dat",)),
        ("mod", ["grid/elec.dat", "config/config.dat"], ("grid/elec.dat", "config/config.dat")),
        ("both", ["config/config.dat"], ("config/config.dat",)),
        ("both", ["grid/elem.dat"], ("grid/elem.dat",)),
        ("inv", ["grid/elem.dat"], ("grid/elem.dat",)),
        ("inv", ["mod/volt.dat", "exe/crmod.cfg"], ("mod/volt.dat",)),
    ],
)
def test_incomplete_names_the_missing_files(tmp_path: Path, kind: str, remove: list, missing: tuple) -> None:
    td = synth.make_tomodir(tmp_path / "td", kind)
    for rel in remove:
        (td / rel).unlink()
    result = classify(td)
    assert result == Incomplete(td, missing)
    assert str(td) in result.message
    assert all(rel in result.message for rel in missing)


def test_no_cfg_at_all_is_incomplete(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", "both")
    (td / "exe/crmod.cfg").unlink()
    (td / "exe/crtomo.cfg").unlink()
    result = classify(td)
    assert isinstance(result, Incomplete)
    assert "no exe/crmod.cfg or exe/crtomo.cfg" in result.message
    assert str(td) in result.message


def test_not_a_tomodir(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", "mod")
    (td / "inv").rmdir()
    assert classify(td) is None
    assert classify(tmp_path) is None


def test_tree(tmp_path: Path) -> None:
    paths = synth.make_tree(tmp_path / "tree", n_mod=3, n_inv=3, n_both=2, nx=4, nz=2)
    finish_inversion(paths[4])
    (paths[0] / "rho/rho.dat").unlink()
    found = discover([tmp_path / "tree"])
    assert [t.path for t in found.todo] == [p for i, p in enumerate(paths) if i not in (0, 4)]
    assert [t.steps for t in found.todo] == [("mod",)] * 2 + [("inv",)] * 2 + [("mod", "inv")] * 2
    assert found.done == [paths[4]]
    assert found.incomplete == [Incomplete(paths[0], ("rho/rho.dat",))]
    assert found.errors == []


def test_walk_rules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    top = synth.make_tomodir(root / "a" / "td", "mod")
    synth.make_tomodir(top / "inv" / "nested", "mod")
    synth.make_tomodir(root / ".hidden" / "td", "mod")
    synth.make_tomodir(root / "b" / ".snapshot", "mod")
    outside = synth.make_tomodir(tmp_path / "outside" / "td", "mod")
    (root / "c").mkdir()
    (root / "c" / "link").symlink_to(outside.parent, target_is_directory=True)
    (root / "c" / "td_link").symlink_to(outside, target_is_directory=True)
    (root / "c" / "file.txt").write_text("not a dir")
    assert [t.path for t in discover([root]).todo] == [top]


def test_given_paths(tmp_path: Path) -> None:
    a, b = synth.make_tree(tmp_path / "tree", n_mod=2)
    link = tmp_path / "link_to_a"
    link.symlink_to(a, target_is_directory=True)
    found = discover([a, tmp_path / "tree", b, link])
    assert [t.path for t in found.todo] == [a, b]
    relative = discover([os.path.relpath(a)])
    assert [t.path for t in relative.todo] == [a]


def test_bad_paths_are_errors_naming_the_path(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    found = discover([tmp_path / "nope", file])
    assert found.todo == [] and found.done == [] and found.incomplete == []
    assert len(found.errors) == 2
    assert "nope" in found.errors[0] and "no such directory" in found.errors[0]
    assert "notes.txt" in found.errors[1] and "not a directory" in found.errors[1]


def test_empty_input() -> None:
    assert discover([]) == Discovery()


def test_sipdir_children_are_tomodirs(tmp_path: Path) -> None:
    sip = synth.make_sipdir(tmp_path / "sip", [1.0, 10.0, 100.0], nx=4, nz=2)
    found = discover([tmp_path])
    assert [t.path.name for t in found.todo] == ["00_1.000000", "01_10.000000", "02_100.000000"]
    assert all(t.path.parent == sip / "invmod" and t.sim_type == "inv" for t in found.todo)


def test_discovery_writes_nothing(tmp_path: Path) -> None:
    synth.make_tree(tmp_path / "tree", n_mod=2, n_inv=2, n_both=1, nx=4, nz=2)
    finish_inversion(tmp_path / "tree" / "site_000" / "td_00002")
    before = state(tmp_path)
    discover([tmp_path / "tree", tmp_path / "missing"])
    assert state(tmp_path) == before


def test_results_are_sorted_and_deterministic(tmp_path: Path) -> None:
    for name in ("zeta", "alpha", "Mid", "beta"):
        synth.make_tomodir(tmp_path / name, "inv", nx=4, nz=2)
    first = discover([tmp_path])
    assert [t.path.name for t in first.todo] == ["Mid", "alpha", "beta", "zeta"]
    assert discover([tmp_path]) == first



def test_real_examples(examples_dir: Path) -> None:
    assert classify(examples_dir / "td_mod_minimal") == Tomodir(examples_dir / "td_mod_minimal", True, False)
    assert classify(examples_dir / "td_mod_hydra_mod1") == Tomodir(examples_dir / "td_mod_hydra_mod1", True, False)
    assert classify(examples_dir / "td_inv_tools_postproc") == Tomodir(examples_dir / "td_inv_tools_postproc", False, True)
    assert classify(examples_dir / "td_inv_hydra_20_157") == Tomodir(examples_dir / "td_inv_hydra_20_157", False, True)

    sip = discover([examples_dir / "sipdir_complex"])
    assert len(sip.todo) == 13
    assert all(t.sim_type == "inv" and not t.needs_mod for t in sip.todo)
    assert [t.path.name for t in sip.todo][:2] == ["01_0.010", "02_0.032"]
    assert sip.done == [] and sip.incomplete == [] and sip.errors == []

    everything = discover([examples_dir])
    assert len(everything.todo) == 17
    assert everything.incomplete == [] and everything.errors == []
