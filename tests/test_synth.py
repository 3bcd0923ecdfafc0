"""The synthetic tomodirs parse back with the counts the formats announce."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cr_queue.tomodir import synth


def parse_elem(path: Path) -> dict:
    """Reads elem.dat the way the solvers do: header, type table, nodes,
    element node lists type by type, then one neighbour per boundary element."""
    tok = path.read_text().split()
    n_nodes, n_types, bandwidth = (int(t) for t in tok[:3])
    types = [tuple(int(t) for t in tok[3 + 3 * k : 6 + 3 * k]) for k in range(n_types)]
    pos = 3 + 3 * n_types
    nodes = {}
    for _ in range(n_nodes):
        nodes[int(tok[pos])] = (float(tok[pos + 1]), float(tok[pos + 2]))
        pos += 3
    elements = {}
    for code, count, per in types:
        elements[code] = [tuple(int(t) for t in tok[pos + per * e : pos + per * (e + 1)]) for e in range(count)]
        pos += count * per
    n_boundary = sum(count for code, count, _ in types if code in (11, 12))
    neighbours = [int(t) for t in tok[pos : pos + n_boundary]]
    assert pos + n_boundary == len(tok), "trailing tokens in elem.dat"
    return {
        "n_nodes": n_nodes,
        "bandwidth": bandwidth,
        "types": types,
        "nodes": nodes,
        "elements": elements,
        "neighbours": neighbours,
    }


def parse_counted(path: Path) -> list[list[str]]:
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    count = int(lines[0][0])
    assert len(lines) - 1 == count, f"{path}: header says {count}, file has {len(lines) - 1} lines"
    return lines[1:]


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("nx,nz", [(3, 1), (8, 4), (17, 5)])
def test_elem_dat_parses_back(tmp_path: Path, nx: int, nz: int) -> None:
    td = synth.make_tomodir(tmp_path / "td", nx=nx, nz=nz)
    grid = parse_elem(td / "grid/elem.dat")

    assert grid["n_nodes"] == (nx + 1) * (nz + 1) == len(grid["nodes"])
    assert grid["types"] == [(8, nx * nz, 4), (12, nx, 2), (11, nx + 2 * nz, 2)]
    quads = grid["elements"][8]
    assert all(n in grid["nodes"] for quad in quads for n in quad)
    assert grid["bandwidth"] == max(max(q) - min(q) for q in quads) + 1
    assert all(grid["nodes"][n][1] == 0.0 for edge in grid["elements"][12] for n in edge)
    assert len(grid["neighbours"]) == 2 * nx + 2 * nz
    for edge, cell in zip(grid["elements"][12] + grid["elements"][11], grid["neighbours"]):
        assert set(edge) <= set(quads[cell - 1]), "boundary neighbour must hold the edge"


def test_electrodes_configs_model_and_data_parse_back(tmp_path: Path) -> None:
    nx, nz = 10, 3
    td = synth.make_tomodir(tmp_path / "td", "inv", nx=nx, nz=nz)
    nodes = parse_elem(td / "grid/elem.dat")["nodes"]

    electrodes = [int(row[0]) for row in parse_counted(td / "grid/elec.dat")]
    assert len(electrodes) == nx + 1
    assert all(nodes[e][1] == 0.0 for e in electrodes)

    configs = [(int(a), int(b)) for a, b in parse_counted(td / "config/config.dat")]
    n = len(electrodes)
    assert len(configs) == sum(n - a - 2 for a in range(1, n - 2))
    for ab, mn in configs:
        a, b, m, nn = ab // 10000, ab % 10000, mn // 10000, mn % 10000
        assert b == a + 1 and m == nn + 1 and nn > b and m <= n

    rho = parse_counted(td / "rho/rho.dat")
    assert len(rho) == nx * nz
    assert all(float(mag) > 0 for mag, _ in rho)

    volt = parse_counted(td / "mod/volt.dat")
    assert [(int(r[0]), int(r[1])) for r in volt] == configs
    assert all(float(r[2]) > 0 and math.isfinite(float(r[3])) for r in volt)


def test_subset_of_electrodes_and_reciprocal_configs(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", nx=12, n_electrodes=6, n_configs=12)
    assert len(parse_counted(td / "grid/elec.dat")) == 6
    configs = [tuple(r) for r in parse_counted(td / "config/config.dat")]
    normal, reciprocal = configs[:6], configs[6:]
    assert reciprocal == [(mn, ab) for ab, mn in normal]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "modelling"},
        {"nx": 2},
        {"nz": 0},
        {"n_electrodes": 3},
        {"n_electrodes": 10, "nx": 8},
        {"n_configs": 0},
        {"n_configs": 10_000},
    ],
)
def test_impossible_requests_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synth.make_tomodir(tmp_path / "td", **kwargs)


EXPECTED = {
    "mod": {"grid/elem.dat", "grid/elec.dat", "config/config.dat", "rho/rho.dat", "exe/crmod.cfg"},
    "inv": {
        "grid/elem.dat", "grid/elec.dat", "config/config.dat", "rho/rho.dat", "exe/crmod.cfg",
        "exe/crtomo.cfg", "exe/crt.lamnull", "mod/volt.dat",
    },
    "both": {
        "grid/elem.dat", "grid/elec.dat", "config/config.dat", "rho/rho.dat", "exe/crmod.cfg",
        "exe/crtomo.cfg", "exe/crt.lamnull",
    },
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_kind_has_its_files_and_all_subdirectories(tmp_path: Path, kind: str) -> None:
    td = synth.make_tomodir(tmp_path / "td", kind)
    files = {p.relative_to(td).as_posix() for p in td.rglob("*") if p.is_file()}
    assert files == EXPECTED[kind]
    for sub in ("exe", "config", "rho", "mod", "inv", "grid"):
        assert (td / sub).is_dir()
    assert not any((td / "inv").iterdir())


def test_cfg_files_name_the_generated_paths(tmp_path: Path) -> None:
    td = synth.make_tomodir(tmp_path / "td", "both")
    crmod = (td / "exe/crmod.cfg").read_text().splitlines()
    assert crmod[1:5] == ["../grid/elem.dat", "../grid/elec.dat", "../rho/rho.dat", "../config/config.dat"]
    assert crmod[7].split()[0] == "T" and crmod[8] == "../mod/volt.dat"
    crtomo = (td / "exe/crtomo.cfg").read_text().splitlines()
    assert int(crtomo[0]) >= 0
    assert crtomo[1:5] == ["../grid/elem.dat", "../grid/elec.dat", "../mod/volt.dat", "../inv"]
    exe = td / "exe"
    for rel in crmod[1:5] + crtomo[1:3]:
        assert (exe / rel).is_file()
    assert len((td / "exe/crt.lamnull").read_text().split()) == 2


def test_same_seed_same_bytes_other_seed_other_model(tmp_path: Path) -> None:
    a = synth.make_tomodir(tmp_path / "a", "inv", seed=7)
    b = synth.make_tomodir(tmp_path / "b", "inv", seed=7)
    c = synth.make_tomodir(tmp_path / "c", "inv", seed=8)
    for rel in EXPECTED["inv"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "rho/rho.dat").read_bytes() != (c / "rho/rho.dat").read_bytes()
    assert (a / "grid/elem.dat").read_bytes() == (c / "grid/elem.dat").read_bytes()


def test_make_tree_nests_and_mixes_kinds(tmp_path: Path) -> None:
    paths = synth.make_tree(tmp_path, n_mod=3, n_inv=4, n_both=2, nx=4, nz=2)
    assert len(paths) == 9 == len(set(paths))
    assert paths == sorted(paths)
    assert all(p.parent.parent == tmp_path for p in paths)
    assert len({p.parent for p in paths}) >= 2
    assert sum((p / "mod/volt.dat").exists() for p in paths) == 4
    assert sum((p / "exe/crtomo.cfg").exists() for p in paths) == 6


@pytest.mark.parametrize("kind", ["inv", "mod"])
def test_make_tree_of_size_reaches_the_budget(tmp_path: Path, kind: str) -> None:
    per = 60_000
    paths = synth.make_tree_of_size(tmp_path, 250_000, kind=kind, per_tomodir_bytes=per, seed=3)
    sizes = [tree_bytes(p) for p in paths]
    assert sum(sizes) >= 250_000
    assert sum(sizes) - sizes[0] < 250_000, "one tomodir too many"
    assert all(abs(s - per) < 0.1 * per for s in sizes)


def test_size_formula_matches_the_written_bytes(tmp_path: Path) -> None:
    for kind in synth.KINDS:
        nx, nz, n_el = synth._shape_for(40)
        td = synth.make_tomodir(tmp_path / kind, kind, nx=nx, nz=nz, n_electrodes=n_el)
        assert tree_bytes(td) == synth._tomodir_bytes(nx, nz, n_el, kind)


def test_make_sipdir(tmp_path: Path) -> None:
    freqs = [0.01, 1.0, 1000.0]
    sip = synth.make_sipdir(tmp_path / "sip", freqs, nx=5, nz=2)
    assert [float(x) for x in (sip / "frequencies.dat").read_text().split()] == freqs
    names = sorted(p.name for p in (sip / "invmod").iterdir())
    assert names == ["00_0.010000", "01_1.000000", "02_1000.000000"]
    for name in names:
        assert (sip / "invmod" / name / "mod/volt.dat").is_file()
        assert (sip / "invmod" / name / "exe/crtomo.cfg").is_file()
