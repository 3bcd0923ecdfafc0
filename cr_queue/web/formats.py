"""Reading what CRMod and CRTomo write, for the pictures of `crh web`.

Pure functions over the text of one file each, with numpy arrays out:

* ``grid/elem.dat``: the mesh (triangles and quadrilaterals; boundary
  elements, types 11 and 12, are not cells);
* ``grid/elec.dat``: the electrodes' node numbers;
* ``rhoNN.mag`` / ``rhoNN.pha`` (CRTomo's models) and ``rho/rho.dat``
  (CRMod's input model): one value per cell, in the order of elem.dat;
* ``inv/inv.ctr``: the data RMS of each iteration;
* ``mod/volt.dat``: the transfer resistances and phases CRMod computed.

The node lines of elem.dat carry a pointer (the first column) that
CRTomo follows when it reads a node number: node ``k`` of an element or
of elec.dat sits at the coordinates of line ``snr(k)`` (relem.for reads
``snr(i), sx(i), sy(i)`` and uses ``sx(snr(k))``).  A grid renumbered with
Cuthill-McKee has a permutation there, not the identity; reading it any
other way turns the mesh inside out (tests/test_web_formats.py checks it
on the real examples: every cell keeps a positive area).

Anything malformed raises :class:`FormatError` naming the file and the
problem; the page then shows that message instead of a picture.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from cr_queue.tomodir import discover

BOUNDARY_TYPES = (11, 12)


class FormatError(ValueError):
    """A file does not have the format CRMod/CRTomo write; the message names it and the problem."""


@dataclass(frozen=True)
class Mesh:
    """Cells as polygons: ``polygons[i]`` is an (n, 2) array of x, z for cell i, in elem.dat's order."""

    nodes: np.ndarray  # (n_nodes, 2) x, z of node number k at row k - 1
    cells: list[np.ndarray]  # per element type: (count, per) node numbers, 1-based
    cell_types: tuple[tuple[int, int, int], ...]  # (type code, count, nodes per cell) of the cells only

    @property
    def n_cells(self) -> int:
        return sum(c.shape[0] for c in self.cells)

    def polygons(self) -> np.ndarray | list[np.ndarray]:
        """A (cells, corners, 2) array when all cells have as many corners, else a list."""
        blocks = [self.nodes[c - 1] for c in self.cells]
        if len(blocks) == 1:
            return blocks[0]
        return [polygon for block in blocks for polygon in block]

    def bounds(self) -> tuple[float, float, float, float]:
        used = np.unique(np.concatenate([c.ravel() for c in self.cells])) - 1
        xz = self.nodes[used]
        return float(xz[:, 0].min()), float(xz[:, 0].max()), float(xz[:, 1].min()), float(xz[:, 1].max())


def _numbers(text: str, name: str) -> list[str]:
    tokens = text.split()
    if not tokens:
        raise FormatError(f"{name} is empty")
    return tokens


def _ints(tokens: list[str], name: str, what: str) -> np.ndarray:
    try:
        return np.array(tokens, dtype=np.int64)
    except ValueError:
        raise FormatError(f"{name}: {what} are not whole numbers") from None


def _floats(tokens: list[str], name: str, what: str) -> np.ndarray:
    try:
        return np.array([t.replace("D", "E").replace("d", "e") for t in tokens], dtype=np.float64)
    except ValueError:
        raise FormatError(f"{name}: {what} are not numbers") from None


def parse_elem(text: str, name: str = "grid/elem.dat") -> Mesh:
    """The mesh of an elem.dat: node coordinates (following the pointer column) and cells."""
    tok = _numbers(text, name)
    try:
        n_nodes, n_types = int(tok[0]), int(tok[1])
        int(tok[2])  # the bandwidth: unused here, but part of the header
    except (ValueError, IndexError):
        raise FormatError(f"{name}: the first line must be 'nodes element-types bandwidth'") from None
    if n_nodes < 3 or not 1 <= n_types <= 20:
        raise FormatError(f"{name}: {n_nodes} nodes in {n_types} element types is not a mesh")
    pos = 3 + 3 * n_types
    header = _ints(tok[3:pos], name, "the element type lines")
    if header.size != 3 * n_types:
        raise FormatError(f"{name}: ends inside the element type lines")
    types = [tuple(int(v) for v in header[3 * k : 3 * k + 3]) for k in range(n_types)]
    node_tokens = tok[pos : pos + 3 * n_nodes]
    if len(node_tokens) != 3 * n_nodes:
        raise FormatError(f"{name}: ends inside the {n_nodes} node lines")
    raw = _floats(node_tokens, name, "the node lines").reshape(n_nodes, 3)
    pointer = raw[:, 0].astype(np.int64)
    if (pointer < 1).any() or (pointer > n_nodes).any() or not np.array_equal(np.sort(pointer), np.arange(1, n_nodes + 1)):
        raise FormatError(f"{name}: the first column of the node lines is not a numbering of the {n_nodes} nodes")
    nodes = raw[pointer - 1, 1:3]
    pos += 3 * n_nodes
    cells: list[np.ndarray] = []
    cell_types: list[tuple[int, int, int]] = []
    for code, count, per in types:
        if count < 0 or per < 2:
            raise FormatError(f"{name}: element type {code} has {count} elements of {per} nodes")
        block = tok[pos : pos + count * per]
        if len(block) != count * per:
            raise FormatError(f"{name}: ends inside the elements of type {code}")
        pos += count * per
        if code in BOUNDARY_TYPES:
            continue
        numbers = _ints(block, name, f"the nodes of element type {code}").reshape(count, per)
        if count and (numbers.min() < 1 or numbers.max() > n_nodes):
            raise FormatError(f"{name}: an element of type {code} names a node outside 1..{n_nodes}")
        cells.append(numbers)
        cell_types.append((code, count, per))
    if not cells or sum(c.shape[0] for c in cells) == 0:
        raise FormatError(f"{name}: no triangles or quadrilaterals (only boundary elements)")
    return Mesh(nodes=nodes, cells=cells, cell_types=tuple(cell_types))


def parse_elec(text: str, mesh: Mesh, name: str = "grid/elec.dat") -> np.ndarray:
    """The electrodes' positions (x, z), one row each, in elec.dat's order."""
    tok = _numbers(text, name)
    numbers = _ints(tok, name, "the lines")
    count = int(numbers[0])
    if count < 0 or numbers.size < count + 1:
        raise FormatError(f"{name}: announces {count} electrodes but lists {numbers.size - 1}")
    electrodes = numbers[1 : count + 1]
    if count and (electrodes.min() < 1 or electrodes.max() > mesh.nodes.shape[0]):
        raise FormatError(f"{name}: an electrode names a node outside 1..{mesh.nodes.shape[0]}")
    return mesh.nodes[electrodes - 1]


def _counted_rows(text: str, name: str, columns: int) -> list[list[str]]:
    """Files that start with a count, then one line of at least ``columns`` values per record."""
    lines = text.splitlines()
    try:
        count = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise FormatError(f"{name}: the first line must start with the number of lines that follow") from None
    rows = [line.split() for line in lines[1 : count + 1]]
    if len(rows) < count or any(len(row) < columns for row in rows):
        raise FormatError(f"{name}: announces {count} lines of {columns} values but has fewer")
    return rows


def parse_model(text: str, name: str, *, cells: int | None = None) -> np.ndarray:
    """The third column of a rhoNN.mag/.pha (x, z, value per cell): log10 of |rho| or the phase in mrad."""
    rows = _counted_rows(text, name, 3)
    values = _floats([row[2] for row in rows], name, "the model values")
    _check_cells(values, cells, name)
    return values


def parse_rho(text: str, name: str = "rho/rho.dat", *, cells: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CRMod's model (magnitude in ohm m, phase in mrad per cell) as log10 |rho| and phase."""
    rows = _counted_rows(text, name, 2)
    mag = _floats([row[0] for row in rows], name, "the magnitudes")
    pha = _floats([row[1] for row in rows], name, "the phases")
    if (mag <= 0).any():
        raise FormatError(f"{name}: a magnitude is not positive")
    _check_cells(mag, cells, name)
    return np.log10(mag), pha


def _check_cells(values: np.ndarray, cells: int | None, name: str) -> None:
    if cells is not None and values.size != cells:
        raise FormatError(f"{name} has {values.size} values, the mesh {cells} cells")


@dataclass(frozen=True)
class Iteration:
    number: int
    kind: str  # "IT": a main iteration; "PIT": one of the final phase improvement
    rms: float | None  # the data RMS (None when CRTomo wrote NaN)


@dataclass(frozen=True)
class Convergence:
    iterations: tuple[Iteration, ...]
    finished: bool  # the last line of inv.ctr starts with ***finished*** (discover's rule)

    @property
    def final_rms(self) -> float | None:
        main = [it.rms for it in self.iterations if it.rms is not None]
        return main[-1] if main else None


_ITERATION = re.compile(r"^\s*(IT|PIT)\s+(\d+)\s+(\S+)")


def parse_inv_ctr(text: str) -> Convergence:
    """The data RMS of each iteration: the lines starting IT (main) and PIT (phase improvement).

    The third field of such a line is the data RMS (CRTomo's FORMAT t11,g10.4
    after the name and the number); update lines (UP) and the header are
    skipped.  The iteration table starts after the line with ``ID it.`` when
    there is one."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ID it." in line), 0)
    iterations = []
    for line in lines[start:]:
        match = _ITERATION.match(line)
        if not match:
            continue
        try:
            rms = float(match.group(3))
        except ValueError:
            continue  # a header such as "IT  RMS  lambda"
        iterations.append(Iteration(int(match.group(2)), match.group(1), rms if math.isfinite(rms) else None))
    last = next((line for line in reversed(lines) if line.strip()), "")
    return Convergence(tuple(iterations), last.strip().startswith(discover.FINISHED))


@dataclass(frozen=True)
class Readings:
    """mod/volt.dat: per measurement the electrodes A, B, M, N, |R| in ohm and the phase in mrad."""

    electrodes: np.ndarray  # (n, 4)
    resistance: np.ndarray
    phase: np.ndarray


def parse_volt(text: str, name: str = "mod/volt.dat") -> Readings:
    rows = _counted_rows(text, name, 4)
    ab = _ints([row[0] for row in rows], name, "the current electrodes")
    mn = _ints([row[1] for row in rows], name, "the voltage electrodes")
    resistance = _floats([row[2] for row in rows], name, "the resistances")
    phase = _floats([row[3] for row in rows], name, "the phases")
    electrodes = np.stack([ab // 10000, ab % 10000, mn // 10000, mn % 10000], axis=1) if rows else np.empty((0, 4), int)
    return Readings(electrodes, resistance, phase)


_FREQUENCY_DIR = re.compile(r"^(\d+)_([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)$")


def frequency_of(tomodir_name: str) -> float | None:
    """The frequency in Hz of a sipdir's tomodir (``invmod/NN_freq``: ``00_0.010000`` or the old ``01_0.010``)."""
    match = _FREQUENCY_DIR.match(tomodir_name)
    return float(match.group(2)) if match else None


_MODEL = re.compile(r"^inv/rho(\d+)\.(mag|pha)$")


def model_member(member: str) -> tuple[str, int] | None:
    """("mag" | "pha", NN) for ``inv/rhoNN.mag``/``.pha``, the models of each iteration."""
    match = _MODEL.match(member)
    return (match.group(2), int(match.group(1))) if match else None
