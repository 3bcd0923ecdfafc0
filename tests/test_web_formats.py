"""The readers of CRMod/CRTomo files behind `crh web`'s pictures (cr_queue/web/formats.py),
the in-memory archive reader (archives.py) and the drawing (pictures.py).

On synthetic tomodirs (the project's generator) run through the stand-in
solvers, and, where ../shared is beside the checkout, on the real examples:
their meshes (triangles and quadrilaterals, renumbered with Cuthill-McKee),
electrodes, CRMod models and data.  No database here.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cr_queue.tomodir import archive, synth
from cr_queue.web import archives, formats

from .conftest import script


@pytest.fixture(scope="module", autouse=True)
def matplotlib_home(tmp_path_factory):
    """matplotlib keeps its font cache in MPLCONFIGDIR: a temporary one, not the user's home."""
    previous = os.environ.get("MPLCONFIGDIR")
    os.environ["MPLCONFIGDIR"] = str(tmp_path_factory.mktemp("matplotlib"))
    yield
    if previous is None:
        os.environ.pop("MPLCONFIGDIR", None)
    else:
        os.environ["MPLCONFIGDIR"] = previous


def _areas(mesh: formats.Mesh) -> np.ndarray:
    """Signed areas of the cells (shoelace): a mesh read the wrong way round has negative ones."""
    areas = []
    for polygon in mesh.polygons():
        x, z = polygon[:, 0], polygon[:, 1]
        areas.append(0.5 * np.sum(x * np.roll(z, -1) - np.roll(x, -1) * z))
    return np.array(areas)


def _colours(png: bytes) -> int:
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")
    return len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))


def _solve(tomodir: Path, solver: str) -> None:
    subprocess.run([script(f"crh_standin_{solver}")], cwd=tomodir / "exe", check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def solved(tmp_path_factory) -> Path:
    """A synthetic tomodir, modelled and inverted by the stand-in solvers (5 iterations)."""
    tomodir = synth.make_tomodir(tmp_path_factory.mktemp("synthetic") / "td", "both", nx=12, nz=5, seed=3)
    (tomodir / "exe" / "standin.cfg").write_text("iterations = 5\n")
    _solve(tomodir, "crmod")
    _solve(tomodir, "crtomo")
    return tomodir


# ---------------------------------------------------------------- synthetic


def test_mesh_and_electrodes_of_a_synthetic_tomodir(solved):
    mesh = formats.parse_elem((solved / "grid/elem.dat").read_text())
    assert mesh.n_cells == 12 * 5 and mesh.cell_types == ((8, 60, 4),)
    areas = _areas(mesh)
    assert np.allclose(np.abs(areas), synth.DX * synth.DZ)
    assert abs(areas.sum()) == pytest.approx(12 * synth.DX * 5 * synth.DZ)
    assert mesh.bounds() == (0.0, 12 * synth.DX, -5 * synth.DZ, 0.0)
    electrodes = formats.parse_elec((solved / "grid/elec.dat").read_text(), mesh)
    assert electrodes.shape == (13, 2)
    assert np.allclose(electrodes[:, 0], np.arange(13) * synth.DX) and np.allclose(electrodes[:, 1], 0.0)


def test_models_rms_and_data_the_stand_in_wrote(solved):
    mesh = formats.parse_elem((solved / "grid/elem.dat").read_text())
    magnitude = formats.parse_model((solved / "inv/rho05.mag").read_text(), "inv/rho05.mag", cells=mesh.n_cells)
    phase = formats.parse_model((solved / "inv/rho05.pha").read_text(), "inv/rho05.pha", cells=mesh.n_cells)
    # The stand-in writes log10 of about 100 ohm m, and about -5 mrad.
    assert np.all(np.abs(magnitude - 2.0) < 0.2) and np.all((phase < 0) & (phase > -12))
    convergence = formats.parse_inv_ctr((solved / "inv/inv.ctr").read_text())
    assert convergence.finished
    assert [(it.kind, it.number) for it in convergence.iterations] == [("IT", n) for n in range(1, 6)]
    assert [it.rms for it in convergence.iterations] == pytest.approx([1 + 10 / (n + 1) for n in range(1, 6)], abs=1e-4)
    assert convergence.final_rms == pytest.approx(1 + 10 / 6, abs=1e-4)
    readings = formats.parse_volt((solved / "mod/volt.dat").read_text())
    configs = (solved / "config/config.dat").read_text().split()
    assert readings.resistance.size == int(configs[0])
    assert readings.electrodes[0].tolist() == [int(configs[1]) // 10000, int(configs[1]) % 10000, int(configs[2]) // 10000, int(configs[2]) % 10000]
    assert np.all(readings.resistance > 0)
    magnitude_in, phase_in = formats.parse_rho((solved / "rho/rho.dat").read_text(), cells=mesh.n_cells)
    assert magnitude_in.size == phase_in.size == mesh.n_cells


def test_a_model_that_does_not_fit_the_mesh_is_named(solved):
    text = (solved / "inv/rho05.mag").read_text()
    with pytest.raises(formats.FormatError, match=r"inv/rho05.mag has 60 values, the mesh 61 cells"):
        formats.parse_model(text, "inv/rho05.mag", cells=61)
    with pytest.raises(formats.FormatError, match="announces 60 lines"):
        formats.parse_model("\n".join(text.splitlines()[:30]), "inv/rho05.mag")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "is empty"),
        ("4 1 3\n8 1 4\n1 0 0\n2 1 0\n", "ends inside the 4 node lines"),
        ("4 1 3\n8 1 4\n1 0 0\n1 1 0\n3 1 1\n4 0 1\n1 2 3 4\n", "not a numbering"),
        ("4 1 3\n8 1 4\n1 0 0\n2 1 0\n3 1 1\n4 0 1\n1 2 3 9\n", r"outside 1\.\.4"),
        ("4 1 3\n12 2 2\n1 0 0\n2 1 0\n3 1 1\n4 0 1\n1 2\n2 3\n1\n1\n", "no triangles or quadrilaterals"),
        ("x 1 3\n", "first line"),
    ],
)
def test_a_broken_elem_dat_is_refused_with_the_reason(text, problem):
    with pytest.raises(formats.FormatError, match=problem):
        formats.parse_elem(text)


def test_inv_ctr_in_crtomo_s_own_layout():
    """The iteration table as CRTomo's FORMAT statements lay it out (t1 a3, t5 i3, t11 g10.4, ...):
    main iterations (IT), updates (UP, skipped), the final phase improvement (PIT), NaN."""
    text = "\n".join(
        [
            "***PARAMETERS***",
            "  ID it.   data RMS    stepsize    lambda      roughn.    CG-steps    mag RMS     pha RMS",
            "IT    0    38.45                                                     38.20       4.312      220",
            "UP    1    12.31      0.5000      1000.       0.1234       12                                 1.000",
            "IT    1    9.870      0.5000      1000.       0.1234       12        9.801       1.210      220    1.000",
            "IT    2    1.012      0.2500      315.2       0.4567       25        1.005       0.987      220    1.000",
            "PIT   0    NaN                                                       1.005       0.987      220",
            "PIT   1    0.998      1.000       100.0       0.2100       8         1.005       0.950      220    1.000",
            "***finished***",
        ]
    )
    convergence = formats.parse_inv_ctr(text)
    assert [(it.kind, it.number, it.rms) for it in convergence.iterations] == [
        ("IT", 0, 38.45), ("IT", 1, 9.87), ("IT", 2, 1.012), ("PIT", 0, None), ("PIT", 1, 0.998)
    ]
    assert convergence.finished and convergence.final_rms == 0.998
    assert not formats.parse_inv_ctr(text.rsplit("\n", 1)[0]).finished


@pytest.mark.parametrize(
    "name, frequency",
    [("00_0.010000", 0.01), ("12_3162.300", 3162.3), ("01_1e-3", 0.001), ("td_00001", None), ("03_", None)],
)
def test_frequency_of_a_sipdir_tomodir(name, frequency):
    assert formats.frequency_of(name) == frequency


# ---------------------------------------------------------------- archives in memory


def _packed(root: Path, members=None) -> bytes:
    out = io.BytesIO()
    archive.pack(root, out, members=members)
    return out.getvalue()


def _select(name: str):
    return formats.model_member(name) or ({"inv/inv.ctr": ("inv.ctr", 0)}.get(name))


def test_members_are_read_in_memory_keeping_the_last_iteration(solved, tmp_path, monkeypatch):
    data = _packed(solved)
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.setenv("TMPDIR", str(empty))
    found = archives.read_members(lambda sink: sink.write(data), _select, tails=frozenset({"inv.ctr"}))
    assert {slot: name for slot, (name, _) in found.items()} == {"mag": "inv/rho05.mag", "pha": "inv/rho05.pha", "inv.ctr": "inv/inv.ctr"}
    assert found["mag"][1] == (solved / "inv/rho05.mag").read_bytes()
    assert found["inv.ctr"][1].endswith(b"(stand-in)\n")
    assert list(empty.iterdir()) == [], "nothing may be written to disk"


def test_a_log_keeps_only_its_tail(tmp_path):
    tomodir = tmp_path / "td"
    (tomodir / "exe").mkdir(parents=True)
    (tomodir / "exe/crh_solver.log").write_text("".join(f"line {i}\n" for i in range(50_000)))
    data = _packed(tomodir)
    found = archives.read_members(lambda sink: sink.write(data), lambda n: ("log", 0) if n.endswith(".log") else None, tails=frozenset({"log"}))
    tail = found["log"][1]
    assert len(tail) == archives.LOG_TAIL_BYTES and tail.endswith(b"line 49999\n")


def test_a_failing_or_corrupt_archive_is_unreadable_not_a_crash(solved):
    def refuse(sink):
        sink.write(b"\x28\xb5\x2f\xfd")
        raise archive.ChecksumMismatch("a" * 64, "b" * 64)

    with pytest.raises(archives.ArchiveUnreadable, match="checksum mismatch"):
        archives.read_members(refuse, _select)
    with pytest.raises(archives.ArchiveUnreadable, match="not a readable tar"):
        archives.read_members(lambda sink: sink.write(b"this is no zstd stream" * 100), _select)
    data = _packed(solved)
    with pytest.raises(archives.ArchiveUnreadable):
        archives.read_members(lambda sink: sink.write(data[: len(data) // 2]), _select)


# ---------------------------------------------------------------- pictures


def test_pictures_of_a_synthetic_inversion_are_drawn(solved):
    from cr_queue.web import pictures

    mesh = formats.parse_elem((solved / "grid/elem.dat").read_text())
    electrodes = formats.parse_elec((solved / "grid/elec.dat").read_text(), mesh)
    magnitude = formats.parse_model((solved / "inv/rho05.mag").read_text(), "mag", cells=mesh.n_cells)
    phase = formats.parse_model((solved / "inv/rho05.pha").read_text(), "pha", cells=mesh.n_cells)
    model = pictures.model_png(mesh, electrodes, [("mag", magnitude, "viridis"), ("pha", phase, "plasma")])
    rms = pictures.rms_png(formats.parse_inv_ctr((solved / "inv/inv.ctr").read_text()))
    volt = pictures.volt_png(formats.parse_volt((solved / "mod/volt.dat").read_text()))
    for png in (model, rms, volt):
        assert png.startswith(b"\x89PNG") and _colours(png) > 20


# ---------------------------------------------------------------- the real examples


REAL_GRIDS = ["td_inv_hydra_20_157", "td_inv_tools_postproc", "td_mod_minimal", "td_mod_hydra_mod1", "sipdir_complex/invmod/02_0.032"]


@pytest.mark.parametrize("name", REAL_GRIDS)
def test_real_meshes_keep_every_cell_the_right_way_round(examples_dir, name):
    """Renumbered grids (Cuthill-McKee) follow the pointer column: read any other way,
    half the cells of td_inv_tools_postproc turn inside out."""
    tomodir = examples_dir / name
    mesh = formats.parse_elem((tomodir / "grid/elem.dat").read_text())
    areas = _areas(mesh)
    assert np.all(areas > 0), f"{(areas <= 0).sum()} cells of {name} have no positive area"
    x0, x1, z0, z1 = mesh.bounds()
    assert areas.sum() == pytest.approx((x1 - x0) * (z1 - z0), rel=1e-6)
    electrodes = formats.parse_elec((tomodir / "grid/elec.dat").read_text(), mesh)
    assert len(electrodes) == int((tomodir / "grid/elec.dat").read_text().split()[0])
    assert np.all((electrodes[:, 0] >= x0) & (electrodes[:, 0] <= x1) & (electrodes[:, 1] >= z0) & (electrodes[:, 1] <= z1))


def test_real_surface_electrodes_lie_on_the_surface(examples_dir):
    for name in ("td_inv_tools_postproc", "sipdir_complex/invmod/02_0.032"):
        tomodir = examples_dir / name
        mesh = formats.parse_elem((tomodir / "grid/elem.dat").read_text())
        electrodes = formats.parse_elec((tomodir / "grid/elec.dat").read_text(), mesh)
        assert np.allclose(electrodes[:, 1], mesh.bounds()[3]), name


@pytest.mark.parametrize("name", ["td_mod_minimal", "td_mod_hydra_mod1", "sipdir_complex/invmod/02_0.032"])
def test_real_crmod_models_fit_their_meshes_and_draw(examples_dir, name):
    from cr_queue.web import pictures

    tomodir = examples_dir / name
    mesh = formats.parse_elem((tomodir / "grid/elem.dat").read_text())
    magnitude, phase = formats.parse_rho((tomodir / "rho/rho.dat").read_text(), cells=mesh.n_cells)
    electrodes = formats.parse_elec((tomodir / "grid/elec.dat").read_text(), mesh)
    png = pictures.model_png(mesh, electrodes, [("mag", magnitude, "viridis"), ("pha", phase, "plasma")])
    assert png.startswith(b"\x89PNG") and _colours(png) > 10


@pytest.mark.parametrize("name", ["td_inv_hydra_20_157", "td_inv_tools_postproc", "sipdir_complex/invmod/02_0.032"])
def test_real_data_files_are_read(examples_dir, name):
    text = (examples_dir / name / "mod/volt.dat").read_text()
    readings = formats.parse_volt(text)
    assert readings.resistance.size == int(text.split()[0]) > 0
    assert readings.electrodes.min() >= 1


def test_a_real_sipdir_side_by_side(examples_dir):
    """All 13 frequencies of the real sipdir (their CRMod models as stand-ins for results) on one scale."""
    from cr_queue.web import pictures

    items = []
    for tomodir in sorted((examples_dir / "sipdir_complex" / "invmod").iterdir(), key=lambda p: formats.frequency_of(p.name)):
        mesh = formats.parse_elem((tomodir / "grid/elem.dat").read_text())
        magnitude, phase = formats.parse_rho((tomodir / "rho/rho.dat").read_text(), cells=mesh.n_cells)
        electrodes = formats.parse_elec((tomodir / "grid/elec.dat").read_text(), mesh)
        items.append((f"{formats.frequency_of(tomodir.name):g} Hz", mesh, electrodes, magnitude, phase))
    assert [title for title, *_ in items][:3] == ["0.01 Hz", "0.032 Hz", "0.1 Hz"] and len(items) == 13
    png = pictures.frequencies_png(items)
    assert png.startswith(b"\x89PNG") and _colours(png) > 50
