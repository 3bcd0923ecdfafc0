"""What a job computed, read from its archives: the science behind the job pages.

A job's input archive holds the mesh (grid/elem.dat, grid/elec.dat) and,
for CRMod, the model (rho/rho.dat); its result archive holds only what the
solver wrote (inv/, mod/volt.dat, and for a failure exe/error.dat and the
solver's log).  Both are read once each, in memory (archives.py), parsed
(formats.py) and kept by sha256: a survey's jobs share one grid, and a
result never changes.  Pictures are drawn from the parsed files and cached
by the result's sha256 (and the input's: the mesh is part of the picture).

Nothing here raises for a job whose files are odd: what cannot be read
becomes a sentence in :attr:`Outputs.problems` or :attr:`Grid.problem`, and
the page shows it where the picture would be.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from cr_queue.db.connection import Database
from cr_queue.web import archives, formats, pictures
from cr_queue.web.cache import Cache

# The solver's log as the worker stores it with a failure (worker.LOG_NAME).
SOLVER_LOG = "exe/crh_solver.log"
LOG_TAIL_LINES = 40

_INPUT_SLOTS = {"grid/elem.dat": "elem", "grid/elec.dat": "elec", "rho/rho.dat": "rho"}
_RESULT_SLOTS = {"inv/inv.ctr": "inv.ctr", "mod/volt.dat": "volt", "exe/error.dat": "error", SOLVER_LOG: "log"}

PICTURES = ("model", "rms", "volt", "input-model")


def _select_input(name: str) -> tuple[str, int] | None:
    slot = _INPUT_SLOTS.get(name)
    return (slot, 0) if slot else None


def _select_result(name: str) -> tuple[str, int] | None:
    slot = _RESULT_SLOTS.get(name)
    if slot:
        return slot, 0
    return formats.model_member(name)  # ("mag" | "pha", NN): the highest NN is kept


def _text(data: bytes) -> str:
    return data.decode("latin-1")


@dataclass
class Grid:
    """The mesh of an input archive, its electrodes and (for CRMod) its model."""

    mesh: formats.Mesh | None = None
    electrodes: np.ndarray | None = None
    rho: tuple[np.ndarray, np.ndarray] | None = None  # log10 |rho|, phase (mrad) per cell
    problem: str | None = None

    @property
    def nbytes(self) -> int:
        arrays = [self.electrodes, *(self.rho or ())]
        if self.mesh is not None:
            arrays += [self.mesh.nodes, *self.mesh.cells]
        return 1024 + sum(a.nbytes for a in arrays if a is not None)


@dataclass
class Outputs:
    """What the solver wrote, as far as the pages show it."""

    convergence: formats.Convergence | None = None
    magnitude: tuple[str, np.ndarray] | None = None  # member name, log10 |rho| per cell
    phase: tuple[str, np.ndarray] | None = None  # member name, phase (mrad) per cell
    readings: formats.Readings | None = None
    error_dat: str | None = None
    log_tail: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        arrays = []
        for pair in (self.magnitude, self.phase):
            if pair is not None:
                arrays.append(pair[1])
        if self.readings is not None:
            arrays += [self.readings.electrodes, self.readings.resistance, self.readings.phase]
        return 4096 + sum(a.nbytes for a in arrays) + len(self.error_dat or "") + sum(len(line) for line in self.log_tail)


class Results:
    """Reads, parses and draws; caches by sha256.  One per server, shared by its threads."""

    def __init__(self, database: Database, *, picture_bytes: int = 64 << 20, parsed_bytes: int = 128 << 20) -> None:
        self.database = database
        self.pictures: Cache[bytes] = Cache(picture_bytes)
        self._parsed: Cache[Any] = Cache(parsed_bytes, size=lambda item: item.nbytes)

    # ------------------------------------------------------------ reading

    def grid(self, conn: psycopg.Connection, input_sha256: str) -> Grid:
        return self._parsed.get_or_make(f"grid:{input_sha256}", lambda: self._read_grid(conn, input_sha256))

    def outputs(self, conn: psycopg.Connection, result_sha256: str) -> Outputs:
        return self._parsed.get_or_make(f"outputs:{result_sha256}", lambda: self._read_outputs(conn, result_sha256))

    def _members(self, conn: psycopg.Connection, sha256: str, select, tails=frozenset()) -> dict[str, tuple[str, bytes]]:
        return archives.read_members(
            lambda sink: archives.copy_blob(self.database, conn, sha256, sink), select, tails=tails
        )

    def _read_grid(self, conn: psycopg.Connection, sha256: str) -> Grid:
        try:
            found = self._members(conn, sha256, _select_input)
        except archives.ArchiveUnreadable as exc:
            return Grid(problem=f"the input archive cannot be read: {exc}")
        if "elem" not in found:
            return Grid(problem="the input archive has no grid/elem.dat")
        grid = Grid()
        try:
            grid.mesh = formats.parse_elem(_text(found["elem"][1]))
            if "elec" in found:
                grid.electrodes = formats.parse_elec(_text(found["elec"][1]), grid.mesh)
            if "rho" in found:
                grid.rho = formats.parse_rho(_text(found["rho"][1]), cells=grid.mesh.n_cells)
        except formats.FormatError as exc:
            grid.problem = str(exc)
        return grid

    def _read_outputs(self, conn: psycopg.Connection, sha256: str) -> Outputs:
        out = Outputs()
        try:
            found = self._members(conn, sha256, _select_result, tails=frozenset({"log"}))
        except archives.ArchiveUnreadable as exc:
            out.problems.append(f"the result archive cannot be read: {exc}")
            return out
        if "inv.ctr" in found:
            out.convergence = formats.parse_inv_ctr(_text(found["inv.ctr"][1]))
        for slot in ("mag", "pha"):
            if slot in found:
                name, data = found[slot]
                try:
                    values = formats.parse_model(_text(data), name)
                except formats.FormatError as exc:
                    out.problems.append(str(exc))
                    continue
                setattr(out, "magnitude" if slot == "mag" else "phase", (name, values))
        if "volt" in found:
            try:
                out.readings = formats.parse_volt(_text(found["volt"][1]))
            except formats.FormatError as exc:
                out.problems.append(str(exc))
        if "error" in found:
            out.error_dat = _text(found["error"][1]).rstrip()
        if "log" in found:
            out.log_tail = _text(found["log"][1]).splitlines()[-LOG_TAIL_LINES:]
        return out

    # ------------------------------------------------------------ pictures

    def picture(self, conn: psycopg.Connection, job: dict[str, Any], kind: str) -> bytes | None:
        """The PNG of ``kind`` (one of :data:`PICTURES`) for a job row of queries.web.job_archives; None when it has none."""
        if kind not in PICTURES:
            return None
        inputs, result = job.get("input_sha256"), job.get("result_sha256")
        if kind == "input-model":
            if not inputs:
                return None
            key = f"{kind}:{inputs}"
        else:
            if not result or job.get("status") not in ("finished", "failed"):
                return None
            key = f"{kind}:{result}:{inputs}"
        make = {"model": self._model, "rms": self._rms, "volt": self._volt, "input-model": self._input_model}[kind]
        return self.pictures.get_or_make(key, lambda: make(conn, job))

    def _model(self, conn: psycopg.Connection, job: dict[str, Any]) -> bytes | None:
        outputs = self.outputs(conn, job["result_sha256"])
        if outputs.magnitude is None or not job.get("input_sha256"):
            return None
        grid = self.grid(conn, job["input_sha256"])
        if grid.mesh is None:
            return None
        panels = [(f"log10 |rho| (ohm m), {outputs.magnitude[0]}", outputs.magnitude[1], "viridis")]
        if outputs.phase is not None:
            panels.append((f"phase (mrad), {outputs.phase[0]}", outputs.phase[1], "plasma"))
        if any(values.size != grid.mesh.n_cells for _, values, _ in panels):
            return None
        return pictures.model_png(grid.mesh, grid.electrodes, panels)

    def _input_model(self, conn: psycopg.Connection, job: dict[str, Any]) -> bytes | None:
        grid = self.grid(conn, job["input_sha256"])
        if grid.mesh is None or grid.rho is None:
            return None
        magnitude, phase = grid.rho
        panels = [("log10 |rho| (ohm m), rho/rho.dat", magnitude, "viridis"), ("phase (mrad), rho/rho.dat", phase, "plasma")]
        return pictures.model_png(grid.mesh, grid.electrodes, panels)

    def _rms(self, conn: psycopg.Connection, job: dict[str, Any]) -> bytes | None:
        convergence = self.outputs(conn, job["result_sha256"]).convergence
        if convergence is None or not any(it.rms is not None for it in convergence.iterations):
            return None
        return pictures.rms_png(convergence)

    def frequencies(self, conn: psycopg.Connection, jobs: list[dict[str, Any]]) -> bytes | None:
        """The final models of a sipdir's finished frequencies side by side (``jobs``: rows of
        queries.web.sipdir_jobs with a ``frequency``, in order); None when none has a model."""
        ready = [j for j in jobs if j["status"] == "finished" and j["result_sha256"] and j["input_sha256"]]
        if not ready:
            return None
        key = "frequencies:" + hashlib.sha256(
            "\n".join(f"{j['frequency']} {j['result_sha256']} {j['input_sha256']}" for j in ready).encode()
        ).hexdigest()
        return self.pictures.get_or_make(key, lambda: self._frequencies(conn, ready))

    def _frequencies(self, conn: psycopg.Connection, jobs: list[dict[str, Any]]) -> bytes | None:
        items = []
        for job in jobs:
            outputs = self.outputs(conn, job["result_sha256"])
            grid = self.grid(conn, job["input_sha256"])
            if outputs.magnitude is None or grid.mesh is None or outputs.magnitude[1].size != grid.mesh.n_cells:
                continue
            phase = outputs.phase[1] if outputs.phase is not None and outputs.phase[1].size == grid.mesh.n_cells else None
            title = f"{job['frequency']:g} Hz" if job["frequency"] is not None else job["source_path"].rstrip("/").rsplit("/", 1)[-1]
            items.append((title, grid.mesh, grid.electrodes, outputs.magnitude[1], phase))
        return pictures.frequencies_png(items) if items else None

    def _volt(self, conn: psycopg.Connection, job: dict[str, Any]) -> bytes | None:
        readings = self.outputs(conn, job["result_sha256"]).readings
        if readings is None or readings.resistance.size == 0:
            return None
        return pictures.volt_png(readings)
