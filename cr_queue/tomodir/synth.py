"""Synthetic tomodirs for tests, demos and benchmarks.

The project may not ship the real example tomodirs, so every fixture is
generated here from the documented file formats: a rectangular mesh of
quadrilaterals with boundary elements, electrodes on the surface nodes,
dipole-dipole configurations, a resistivity model and (for inversions) a
plausible data set. The numbers are fake but the structure is what CRMod and
CRTomo read, so the queue is exercised on realistic inputs.

All numeric files use fixed-width columns (as the Fortran tools write them),
which makes their size an exact function of the grid dimensions; that is
what lets ``make_tree_of_size`` hit a byte budget without trial writes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KINDS = ("mod", "inv", "both")
TOMODIR_SUBDIRS = ("exe", "config", "rho", "mod", "inv", "grid")

DX = 1.0
DZ = 0.5
BACKGROUND_OHMM = 100.0
BACKGROUND_MRAD = -5.0

_HEADER_WIDTH = 12
_NODE_LINE = 8 + 12 + 12 + 1
_QUAD_LINE = 4 * 8 + 1
_EDGE_LINE = 2 * 8 + 1
_NEIGHBOUR_LINE = 8 + 1
_COUNT_LINE = _HEADER_WIDTH + 1
_TRIPLE_LINE = 3 * _HEADER_WIDTH + 1
_CONFIG_LINE = 12 + 12 + 1
_RHO_LINE = 12 + 12 + 1
_VOLT_LINE = 12 + 12 + 16 + 16 + 1


@dataclass(frozen=True)
class _Grid:
    """Geometry shared by every tomodir of the same shape.

    Cached because a benchmark tree has hundreds of tomodirs on one grid (as
    a real survey does) and formatting the mesh is the expensive part.
    """

    nx: int
    nz: int
    n_nodes: int
    n_cells: int
    electrode_x: tuple[float, ...]
    configs: tuple[tuple[int, int, int, int], ...]
    elem_text: str
    elec_text: str
    config_text: str


def _node(i: int, j: int, nz: int) -> int:
    # Column-wise numbering keeps the bandwidth at nz + 3, as a
    # Cuthill-McKee-renumbered real grid would have a small bandwidth.
    return i * (nz + 1) + j + 1


def _cell(i: int, j: int, nz: int) -> int:
    return i * nz + j + 1


def _electrode_columns(nx: int, n_electrodes: int) -> list[int]:
    if n_electrodes == nx + 1:
        return list(range(nx + 1))
    return [round(k * nx / (n_electrodes - 1)) for k in range(n_electrodes)]


def _dipole_dipole(n_electrodes: int) -> list[tuple[int, int, int, int]]:
    # M beyond N (as in the example data) keeps the transfer resistance of
    # a dipole-dipole reading positive over a homogeneous half-space.
    return [
        (a, a + 1, m + 1, m)
        for a in range(1, n_electrodes - 2)
        for m in range(a + 2, n_electrodes)
    ]


def _configurations(n_electrodes: int, n_configs: int | None) -> list[tuple[int, int, int, int]]:
    normal = _dipole_dipole(n_electrodes)
    if n_configs is None:
        return normal
    available = normal + [(m, n, a, b) for a, b, m, n in normal]
    if not 1 <= n_configs <= len(available):
        raise ValueError(
            f"n_configs={n_configs} is impossible with {n_electrodes} electrodes: "
            f"between 1 and {len(available)} (dipole-dipole plus reciprocals); "
            "use more electrodes (a larger nx) for more configurations"
        )
    return available[:n_configs]


def _check_shape(nx: int, nz: int, n_electrodes: int | None) -> int:
    if nx < 3 or nz < 1:
        raise ValueError(f"grid nx={nx}, nz={nz} is too small: need nx >= 3 and nz >= 1")
    n = nx + 1 if n_electrodes is None else n_electrodes
    if not 4 <= n <= nx + 1:
        raise ValueError(
            f"n_electrodes={n} does not fit: a dipole-dipole survey needs at least 4 "
            f"and the surface of an nx={nx} grid has {nx + 1} nodes"
        )
    return n


@lru_cache(maxsize=16)
def _grid(nx: int, nz: int, n_electrodes: int, n_configs: int | None) -> _Grid:
    n_nodes = (nx + 1) * (nz + 1)
    n_cells = nx * nz
    top = [(_node(i, 0, nz), _node(i + 1, 0, nz), _cell(i, 0, nz)) for i in range(nx)]
    mixed = (
        [(_node(nx, j, nz), _node(nx, j + 1, nz), _cell(nx - 1, j, nz)) for j in range(nz)]
        + [(_node(i + 1, nz, nz), _node(i, nz, nz), _cell(i, nz - 1, nz)) for i in reversed(range(nx))]
        + [(_node(0, j + 1, nz), _node(0, j, nz), _cell(0, j, nz)) for j in reversed(range(nz))]
    )
    parts = [
        f"{n_nodes:12d}{3:12d}{nz + 3:12d}\n",
        f"{8:12d}{n_cells:12d}{4:12d}\n",
        f"{12:12d}{len(top):12d}{2:12d}\n",
        f"{11:12d}{len(mixed):12d}{2:12d}\n",
    ]
    parts += [
        f"{_node(i, j, nz):8d}{i * DX:12.4f}{-j * DZ:12.4f}\n"
        for i in range(nx + 1)
        for j in range(nz + 1)
    ]
    parts += [
        f"{_node(i, j + 1, nz):8d}{_node(i + 1, j + 1, nz):8d}"
        f"{_node(i + 1, j, nz):8d}{_node(i, j, nz):8d}\n"
        for i in range(nx)
        for j in range(nz)
    ]
    parts += [f"{a:8d}{b:8d}\n" for a, b, _ in top + mixed]
    parts += [f"{c:8d}\n" for _, _, c in top + mixed]

    columns = _electrode_columns(nx, n_electrodes)
    elec_text = f"{len(columns):12d}\n" + "".join(f"{_node(i, 0, nz):12d}\n" for i in columns)
    configs = _configurations(n_electrodes, n_configs)
    config_text = f"{len(configs):12d}\n" + "".join(
        f"{a * 10000 + b:12d}{m * 10000 + n:12d}\n" for a, b, m, n in configs
    )
    return _Grid(
        nx=nx,
        nz=nz,
        n_nodes=n_nodes,
        n_cells=n_cells,
        electrode_x=tuple(i * DX for i in columns),
        configs=tuple(configs),
        elem_text="".join(parts),
        elec_text=elec_text,
        config_text=config_text,
    )


def _rho_text(grid: _Grid, rng: random.Random) -> tuple[str, float, float]:
    """A noisy background with one conductive, polarisable block.

    Returns the text and the mean magnitude and phase, from which the fake
    data are derived so that data and model belong together.
    """
    nx, nz = grid.nx, grid.nz
    i0 = rng.randrange(nx)
    i1 = min(nx, i0 + max(1, nx // 4))
    j0 = rng.randrange(nz)
    j1 = min(nz, j0 + max(1, nz // 3))
    rnd = rng.random
    values = [
        (10.0, -20.0) if i0 <= i < i1 and j0 <= j < j1 else (BACKGROUND_OHMM, BACKGROUND_MRAD)
        for i in range(nx)
        for j in range(nz)
    ]
    lines = [f"{m * (0.9 + 0.2 * rnd()):12.4f}{p + rnd() - 0.5:12.4f}\n" for m, p in values]
    mean_mag = sum(m for m, _ in values) / len(values)
    mean_pha = sum(p for _, p in values) / len(values)
    return f"{grid.n_cells:12d}\n" + "".join(lines), mean_mag, mean_pha


def _geometric_factor(grid: _Grid, a: int, b: int, m: int, n: int) -> float:
    x = grid.electrode_x

    def inv(p: int, q: int) -> float:
        return 1.0 / abs(x[p - 1] - x[q - 1])

    return 2.0 * math.pi / (inv(a, m) - inv(b, m) - inv(a, n) + inv(b, n))


def _volt_text(grid: _Grid, rng: random.Random, mean_mag: float, mean_pha: float) -> str:
    gauss = rng.gauss
    lines = [
        f"{a * 10000 + b:12d}{m * 10000 + n:12d}"
        f"{abs(mean_mag / _geometric_factor(grid, a, b, m, n)) * (1.0 + 0.02 * gauss(0.0, 1.0)):16.8E}"
        f"{mean_pha + 0.3 * gauss(0.0, 1.0):16.8E}\n"
        for a, b, m, n in grid.configs
    ]
    return f"{len(lines):12d}\n" + "".join(lines)


def _crmod_cfg(n_nodes: int) -> str:
    return (
        "***FILES***\n"
        "../grid/elem.dat\n"
        "../grid/elec.dat\n"
        "../rho/rho.dat\n"
        "../config/config.dat\n"
        "F                ! potentials ?\n"
        "../mod/pot/pot.dat\n"
        "T                ! measurements ?\n"
        "../mod/volt.dat\n"
        "F                ! sensitivities ?\n"
        "../mod/sens/sens.dat\n"
    ) + _cfg_tail(n_nodes)


def _crtomo_cfg(n_nodes: int) -> str:
    return (
        "1\n"
        "../grid/elem.dat\n"
        "../grid/elec.dat\n"
        "../mod/volt.dat\n"
        "../inv\n"
        "F                ! difference inversion ?\n"
        "\n"
        "\n"
        "\n"
        "iseed variance\n"
        "0                ! # cells in x-direction\n"
        "0                ! # cells in z-direction\n"
        "1.0000           ! smoothing parameter in x-direction\n"
        "1.0000           ! smoothing parameter in z-direction\n"
        "10               ! max. # inversion iterations\n"
        "F                ! DC inversion ?\n"
        "F                ! robust inversion ?\n"
        "F                ! final phase improvement ?\n"
        "3                ! rel. resistance error level (%)\n"
        "1e-3             ! min. abs. resistance error (ohm)\n"
        "0                ! phase error model parameter A1 (mrad/ohm^B)\n"
        "0                ! phase error model parameter B (-)\n"
        "0                ! phase error model parameter A2 (%)\n"
        "1e-1             ! phase error model parameter A3 (mrad)\n"
        "T                ! homogeneous background resistivity ?\n"
        f"{BACKGROUND_OHMM:<16.2f} ! background magnitude (ohm*m)\n"
        f"{BACKGROUND_MRAD:<16.3f} ! background phase (mrad)\n"
        + _cfg_tail(n_nodes)
        + "1\n"
        "lambda\n"
    )


def _cfg_tail(n_nodes: int) -> str:
    """What crmod.cfg and crtomo.cfg both end with: one dataset, 2D, the sink, no boundary values."""
    return (
        "F                ! another dataset ?\n"
        "0                ! 2D (=0) or 2.5D (=1)\n"
        "F                ! fictitious sink ?\n"
        f"{n_nodes // 2:<16d} ! fictitious sink node number\n"
        "F                ! boundary values ?\n"
        "boundary.dat\n"
    )


def _lamnull(n_cells: int) -> str:
    return f"{float(n_cells):25.16f}     \n{0.0:25.16f}     \n"


def _files(grid: _Grid, kind: str, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    rho, mean_mag, mean_pha = _rho_text(grid, rng)
    files = {
        "grid/elem.dat": grid.elem_text,
        "grid/elec.dat": grid.elec_text,
        "config/config.dat": grid.config_text,
        "rho/rho.dat": rho,
        "exe/crmod.cfg": _crmod_cfg(grid.n_nodes),
    }
    if kind in ("inv", "both"):
        files["exe/crtomo.cfg"] = _crtomo_cfg(grid.n_nodes)
        files["exe/crt.lamnull"] = _lamnull(grid.n_cells)
    if kind == "inv":
        files["mod/volt.dat"] = _volt_text(grid, rng, mean_mag, mean_pha)
    return files


def make_tomodir(
    path: Path,
    kind: str = "mod",
    *,
    nx: int = 8,
    nz: int = 4,
    n_electrodes: int | None = None,
    n_configs: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tomodir ready for CRMod ("mod"), CRTomo ("inv") or both.

    "both" has no mod/volt.dat, so it needs modelling before the inversion.
    mod/pot and mod/sens exist (empty) because the solvers do not create
    output directories themselves.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown: use one of {', '.join(KINDS)}")
    n = _check_shape(nx, nz, n_electrodes)
    grid = _grid(nx, nz, n, n_configs)
    path = Path(path)
    for sub in TOMODIR_SUBDIRS + ("mod/pot", "mod/sens"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for rel, text in _files(grid, kind, seed).items():
        (path / rel).write_text(text, encoding="ascii")
    return path


def _tree_path(root: Path, index: int, per_site: int) -> Path:
    return root / f"site_{index // per_site:03d}" / f"td_{index:05d}"


def make_tree(
    root: Path,
    *,
    n_mod: int = 0,
    n_inv: int = 0,
    n_both: int = 0,
    nx: int = 8,
    nz: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Tomodirs spread over nested site folders, as a scientist's survey is.

    The paths are returned in sorted order, the order discovery reports.
    """
    kinds = ["mod"] * n_mod + ["inv"] * n_inv + ["both"] * n_both
    return [
        make_tomodir(_tree_path(Path(root), i, 8), kind, nx=nx, nz=nz, seed=seed + i)
        for i, kind in enumerate(kinds)
    ]


def _shape_for(nx: int) -> tuple[int, int, int | None]:
    """Grid proportions used for benchmark trees.

    A fixed electrode count keeps the data files from growing quadratically
    with the grid, so the mesh and model dominate as in real tomodirs.
    """
    nz = max(2, nx // 4)
    return nx, nz, min(nx + 1, 48)


def _tomodir_bytes(nx: int, nz: int, n_electrodes: int, kind: str) -> int:
    """Exact size of make_tomodir's files (fixed-width columns)."""
    n_nodes = (nx + 1) * (nz + 1)
    n_cells = nx * nz
    n_edges = nx + (2 * nz + nx)
    n_configs = len(_dipole_dipole(n_electrodes))
    size = (
        4 * _TRIPLE_LINE
        + n_nodes * _NODE_LINE
        + n_cells * _QUAD_LINE
        + n_edges * (_EDGE_LINE + _NEIGHBOUR_LINE)
        + _COUNT_LINE * (1 + n_electrodes)
        + _COUNT_LINE + n_configs * _CONFIG_LINE
        + _COUNT_LINE + n_cells * _RHO_LINE
        + len(_crmod_cfg(n_nodes))
    )
    if kind in ("inv", "both"):
        size += len(_crtomo_cfg(n_nodes)) + len(_lamnull(n_cells))
    if kind == "inv":
        size += _COUNT_LINE + n_configs * _VOLT_LINE
    return size


def _nx_for_bytes(per_tomodir_bytes: int, kind: str) -> int:
    lo, hi = 3, 3
    while _tomodir_bytes(*_shape_for(hi), kind) < per_tomodir_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _tomodir_bytes(*_shape_for(mid), kind) < per_tomodir_bytes:
            lo = mid
        else:
            hi = mid
    below, above = (_tomodir_bytes(*_shape_for(n), kind) for n in (lo, hi))
    return lo if per_tomodir_bytes - below <= above - per_tomodir_bytes else hi


def make_tree_of_size(
    root: Path,
    total_bytes: int,
    *,
    kind: str = "inv",
    per_tomodir_bytes: int = 1_000_000,
    seed: int = 0,
) -> list[Path]:
    """Enough tomodirs of about per_tomodir_bytes each to reach total_bytes.

    All share one grid (formatted once), so only the model and data are
    formatted per tomodir; that keeps 100 MB within a few seconds.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown: use one of {', '.join(KINDS)}")
    if total_bytes <= 0 or per_tomodir_bytes <= 0:
        raise ValueError("total_bytes and per_tomodir_bytes must be positive")
    nx, nz, n_electrodes = _shape_for(_nx_for_bytes(per_tomodir_bytes, kind))
    size = _tomodir_bytes(nx, nz, n_electrodes, kind)
    count = max(1, math.ceil(total_bytes / size))
    return [
        make_tomodir(
            _tree_path(Path(root), i, 50), kind, nx=nx, nz=nz, n_electrodes=n_electrodes, seed=seed + i
        )
        for i in range(count)
    ]


def make_sipdir(path: Path, frequencies: list[float], **kw) -> Path:
    """A spectral-induced-polarisation directory: one tomodir per frequency.

    Uses the naming current crtomo_tools write (``00_0.010000``); keyword
    arguments go to make_tomodir (kind defaults to "inv").
    """
    path = Path(path)
    kind = kw.pop("kind", "inv")
    seed = kw.pop("seed", 0)
    (path / "invmod").mkdir(parents=True, exist_ok=True)
    (path / "frequencies.dat").write_text(
        "".join(f"{f:.6f}\n" for f in frequencies), encoding="ascii"
    )
    for i, f in enumerate(frequencies):
        make_tomodir(path / "invmod" / f"{i:02d}_{f:.6f}", kind, seed=seed + i, **kw)
    return path
