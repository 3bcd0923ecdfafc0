"""Stand-in for the CRMod and CRTomo binaries.

Tests and ``crh demo`` need a solver that behaves like the real ones where
the queue can see it: run with exe/ as working directory and no arguments,
paths taken from crmod.cfg / crtomo.cfg relative to exe/, a pid file while
running, output files in mod/ or inv/, and failures that exit with status 0
and leave exe/error.dat. The numbers it writes are fake but deterministic.

Failures (error.dat, exit codes, signals, no output, hangs) and large
outputs can be injected per tomodir through exe/standin.cfg (``key = value``
lines) or the environment, so one job of a batch can fail: the settings are
described in standin_settings.py.  ``CRH_STANDIN_MARK=<dir>`` appends
``<pid> <solver> <cwd>`` to ``<dir>/runs.log`` at every start, so tests can
count solver runs, and records what each run wrote (standin_settings.record).

This module is spawned once per job: it imports nothing beyond a few
builtin stdlib modules and nothing from cr_queue but standin_settings.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
import zlib

from cr_queue.solvers.standin_settings import SETTINGS_FILE, Settings, UsageError, record

SOLVERS = ("crmod", "crtomo")
LARGE_NAME = "large.bin"

# Every file this run wrote or appended to, relative to exe/ (see standin_settings.record).
_WRITTEN: set[str] = set()

_ERROR_TEXT = {1: "Error opening", 2: "End of file", 3: "Error reading"}


class SolverError(Exception):
    """A failure the real solvers report through exe/error.dat, not an exit status."""

    def __init__(self, fetxt: str, errnr: int, detail: str = "") -> None:
        super().__init__(fetxt)
        self.fetxt = fetxt
        self.errnr = errnr
        self.detail = detail


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _mark(solver: str) -> None:
    directory = os.environ.get("CRH_STANDIN_MARK")
    if not directory:
        return
    line = f"{os.getpid()} {solver} {os.getcwd()}\n".encode()
    try:
        fd = os.open(os.path.join(directory, "runs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        print(f"stand-in: cannot append to {directory}/runs.log: {exc}", file=sys.stderr)


def _threads() -> str:
    return os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)


def _write_pid(name: str) -> None:
    with open(name, "w") as fh:
        fh.write(f"{os.getpid():12d}\n")


def _write_error_dat(solver: str, err: SolverError) -> None:
    """The layout of the Fortran: a PID line (CRTomo only), then
    ``(a80,i3,i1)`` text, error number and flag, then a message line.

    gfortran's list-directed PID line has a leading blank and a wide number
    field; the stand-in writes it without them, as the project documents it,
    so readers must split on whitespace rather than match exact spacing.
    """
    lines = []
    if solver == "crtomo":
        lines.append(f"CRTomo PID {os.getpid()} exited abnormally")
    lines.append(f"{err.fetxt[:80]:<80}{err.errnr:3d}2")
    message = f"{_ERROR_TEXT.get(err.errnr, 'Error')} {err.fetxt}"
    if err.detail:
        message += f" ({err.detail})"
    lines.append(f" {message}")
    with open("error.dat", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _cfg_lines(name: str, skip_comments: bool) -> list[str]:
    try:
        with open(name, encoding="latin-1") as fh:
            lines = [line.rstrip("\r\n") for line in fh]
    except OSError:
        raise SolverError(name, 1) from None
    if skip_comments:
        lines = [line for line in lines if not line.lstrip().startswith("#")]
    return lines


def _flag(text: str) -> bool:
    token = text.split()[0].lstrip(".").upper() if text.split() else ""
    return token.startswith("T")


def _tokens(path: str) -> list[str]:
    try:
        with open(path, encoding="latin-1") as fh:
            return fh.read().split()
    except OSError:
        raise SolverError(path, 1) from None


def _read_grid(path: str) -> tuple[dict[int, tuple[float, float]], list[tuple[int, ...]]]:
    """Nodes and the non-boundary cells of elem.dat (types 11/12 are edges)."""
    tok = _tokens(path)
    try:
        n_nodes, n_types = int(tok[0]), int(tok[1])
        types = [(int(tok[3 + 3 * k]), int(tok[4 + 3 * k]), int(tok[5 + 3 * k])) for k in range(n_types)]
        pos = 3 + 3 * n_types
        nodes = {}
        for _ in range(n_nodes):
            nodes[int(tok[pos])] = (float(tok[pos + 1]), float(tok[pos + 2]))
            pos += 3
        cells: list[tuple[int, ...]] = []
        for code, count, per in types:
            if code not in (11, 12):
                cells += [tuple(int(t) for t in tok[pos + per * e : pos + per * (e + 1)]) for e in range(count)]
            pos += count * per
        if pos > len(tok) or not cells or any(n not in nodes for c in cells for n in c):
            raise ValueError
    except (ValueError, IndexError):
        raise SolverError(path, 3, "not a valid elem.dat") from None
    return nodes, cells


def _read_counted(path: str, columns: int) -> list[list[str]]:
    """Files that start with a count, then one record of ``columns`` values per line."""
    try:
        with open(path, encoding="latin-1") as fh:
            header = fh.readline().split()
            count = int(header[0])
            rows = [fh.readline().split() for _ in range(count)]
    except OSError:
        raise SolverError(path, 1) from None
    except (ValueError, IndexError):
        raise SolverError(path, 3, "no count in the first line") from None
    if any(len(row) < columns for row in rows):
        raise SolverError(path, 2, f"fewer than the {count} announced lines")
    return rows


def _centroids(nodes: dict[int, tuple[float, float]], cells: list[tuple[int, ...]]) -> list[tuple[float, float]]:
    return [
        (sum(nodes[n][0] for n in c) / len(c), sum(nodes[n][1] for n in c) / len(c))
        for c in cells
    ]


def _wiggle(*values: object) -> float:
    """A deterministic pseudo-random number in [-1, 1) from the inputs."""
    return zlib.crc32(repr(values).encode()) / 2**31 - 1.0


def _split_output(path: str, index: int) -> str:
    # CRMod numbers its per-configuration files by inserting the index before
    # the extension: ../mod/pot/pot.dat -> ../mod/pot/pot0001.dat
    stem, ext = os.path.splitext(path)
    return f"{stem}{index:04d}{ext}"


def _write(path: str, text: str | bytes) -> None:
    _WRITTEN.add(path)
    try:
        with open(path, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise SolverError(path, 1, exc.strerror or "") from None


def _append(path: str, text: str) -> None:
    _WRITTEN.add(path)
    try:
        with open(path, "a") as fh:
            fh.write(text)
    except OSError as exc:
        raise SolverError(path, 1, exc.strerror or "") from None


def _write_large(directory: str, size: int, solver: str) -> None:
    """``size`` incompressible bytes, the same for every run of the same size and solver."""
    if size:
        _say(f" Writing {size} bytes of {LARGE_NAME}")
        _write(os.path.join(directory, LARGE_NAME), random.Random(f"{solver}:{size}").randbytes(size))


class _Crmod:
    def __init__(self) -> None:
        lines = _cfg_lines("crmod.cfg", skip_comments=False)
        if len(lines) < 11:
            raise SolverError("crmod.cfg", 2)
        self.elem, self.elec, self.rho, self.config = (line.strip() for line in lines[1:5])
        self.lpot, self.dpot = _flag(lines[5]), lines[6].strip()
        self.lvolt, self.dvolt = _flag(lines[7]), lines[8].strip()
        self.lsens, self.dsens = _flag(lines[9]), lines[10].strip()

    def load(self) -> None:
        nodes, cells = _read_grid(self.elem)
        electrodes = [int(row[0]) for row in _read_counted(self.elec, 1)]
        if any(e not in nodes for e in electrodes):
            raise SolverError(self.elec, 3, "electrode on a node not in elem.dat")
        rho = _read_counted(self.rho, 2)
        if len(rho) != len(cells):
            raise SolverError(self.rho, 3, f"{len(rho)} values for {len(cells)} elements")
        configs = [(int(r[0]), int(r[1])) for r in _read_counted(self.config, 2)]
        for ab, mn in configs:
            if not all(1 <= e <= len(electrodes) for e in (ab // 10000, ab % 10000, mn // 10000, mn % 10000)):
                raise SolverError(self.config, 3, f"electrode out of range in {ab} {mn}")
        self.nodes, self.cells, self.configs = nodes, cells, configs
        self.positions = [nodes[e] for e in electrodes]
        self.mag = sum(float(r[0]) for r in rho) / len(rho)
        self.pha = sum(float(r[1]) for r in rho) / len(rho)

    def _resistance(self, ab: int, mn: int) -> tuple[float, float]:
        def inv(p: int, q: int) -> float:
            (x1, z1), (x2, z2) = self.positions[p - 1], self.positions[q - 1]
            d = math.hypot(x1 - x2, z1 - z2)
            return 1.0 / d if d else 0.0

        a, b, m, n = ab // 10000, ab % 10000, mn // 10000, mn % 10000
        k = inv(a, m) - inv(b, m) - inv(a, n) + inv(b, n)
        r = abs(self.mag * k / (2.0 * math.pi)) * (1.0 + 0.01 * _wiggle(ab, mn))
        return r, self.pha + 0.1 * _wiggle(mn, ab)

    def volt_text(self, rows: int | None = None) -> str:
        lines = [f"{len(self.configs):12d}\n"]
        for ab, mn in self.configs[:rows]:
            r, p = self._resistance(ab, mn)
            lines.append(f"{ab:12d}{mn:12d}{r:16.8E}{p:16.8E}\n")
        return "".join(lines)

    def write_outputs(self) -> None:
        if self.lvolt:
            _say(" Writing", self.dvolt)
            _write(self.dvolt, self.volt_text())
        if self.lpot:
            coords = [self.nodes[n] for n in sorted(self.nodes)]
            for i, (ab, mn) in enumerate(self.configs, 1):
                _write(_split_output(self.dpot, i), f"{len(coords):12d}\n" + "".join(
                    f"{x:12.4f}{z:12.4f}{_wiggle(i, x, z):16.8E}{0.0:16.8E}\n" for x, z in coords
                ))
        if self.lsens:
            centres = _centroids(self.nodes, self.cells)
            for i, (ab, mn) in enumerate(self.configs, 1):
                _write(_split_output(self.dsens, i), f"{len(centres):12d}\n" + "".join(
                    f"{x:12.4f}{z:12.4f}{_wiggle(ab, mn, x, z) * 1e-3:16.8E}{0.0:16.8E}\n" for x, z in centres
                ))

    def write_partial(self) -> None:
        if self.lvolt:
            _write(self.dvolt, self.volt_text(rows=max(1, len(self.configs) // 2)))


class _Crtomo:
    def __init__(self, iterations: int) -> None:
        lines = _cfg_lines("crtomo.cfg", skip_comments=True)
        if len(lines) < 5:
            raise SolverError("crtomo.cfg", 2)
        try:
            self.mswitch = int(lines[0].split()[0])
        except (ValueError, IndexError):
            raise SolverError("crtomo.cfg", 3, "mswitch in line 1") from None
        self.elem, self.elec, self.volt, self.inv = (line.strip() for line in lines[1:5])
        self.iterations = iterations

    def load(self) -> None:
        nodes, cells = _read_grid(self.elem)
        _read_counted(self.elec, 1)
        self.data = [(int(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in _read_counted(self.volt, 4)]
        if not os.path.isdir(self.inv):
            raise SolverError(os.path.join(self.inv, "run.ctr"), 1)
        self.centres = _centroids(nodes, cells)

    def _path(self, name: str) -> str:
        return os.path.join(self.inv, name)

    def start(self) -> None:
        _write(self._path("run.ctr"), "".join(f"{line}\n" for line in (
            "CRTomo stand-in (cr_queue): fake inversion, not a real result",
            f" OpenMP max threads: {_threads()}",
            f" mswitch: {self.mswitch}",
            f" grid: {self.elem}  {len(self.centres)} elements",
            f" data: {self.volt}  {len(self.data)} measurements",
        )))
        _write(self._path("inv.ctr"), "".join(f"{line}\n" for line in (
            "CRTomo stand-in (cr_queue)",
            f"  {len(self.data)} measurements, {len(self.centres)} parameters",
            "  IT    RMS       lambda",
        )))

    def iteration(self, it: int) -> None:
        shrink = 1.0 / (it + 1)
        mags = [100.0 * (1.0 + 0.3 * shrink * _wiggle(it, x, z)) for x, z in self.centres]
        phas = [-5.0 * (1.0 + shrink * _wiggle(z, it, x)) for x, z in self.centres]
        n = f"{len(self.centres):12d}\n"
        _write(self._path(f"rho{it:02d}.mag"), n + "".join(
            f"{x:12.4f}{z:12.4f}{math.log10(m):16.8E}\n" for (x, z), m in zip(self.centres, mags)
        ))
        _write(self._path(f"rho{it:02d}.pha"), n + "".join(
            f"{x:12.4f}{z:12.4f}{p:16.8E}\n" for (x, z), p in zip(self.centres, phas)
        ))
        _write(self._path(f"rho{it:02d}.sig"), n + "".join(
            f"{1.0 / m:16.8E}{p * 1e-3 / m:16.8E}\n" for m, p in zip(mags, phas)
        ))
        _write(self._path(f"volt{it:02d}.dat"), f"{len(self.data):12d}\n" + "".join(
            f"{ab:12d}{mn:12d}{r * (1.0 + 0.05 * shrink * _wiggle(it, ab, mn)):16.8E}{p:16.8E}\n"
            for ab, mn, r, p in self.data
        ))
        rms = 1.0 + 10.0 * shrink
        _append(self._path("inv.ctr"), f"IT  {it:3d}  {rms:10.4f}  {1000.0 * shrink:10.4f}\n")
        _append(self._path("run.ctr"), f" Iteration {it:3d} : RMS {rms:.4f}\n")

    def finish(self) -> None:
        _append(self._path("inv.ctr"), f"***finished*** after {self.iterations} iterations (stand-in)\n")
        _write("inv.lastmod", os.path.join(self.inv, f"rho{self.iterations:02d}.mag") + "\n")


def _hang() -> None:
    _say(" Iteration   1 : Updating")
    while True:
        time.sleep(3600)


def _kill_self(sig: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)  # Python's own handlers (SIGINT) would not end the process
    os.kill(os.getpid(), sig)
    time.sleep(60)  # a signal whose default is not to end (none of the usual): stay until killed


def _run(solver: str) -> int:
    _mark(solver)
    settings = Settings(solver)
    fail, sleep, iterations = settings.fail, settings.sleep, settings.iterations
    name = "CRMod" if solver == "crmod" else "CRTomo"
    _say(f"######### {name} stand-in (cr_queue) ############")
    _say(f" {name} Process_ID :: {os.getpid()}")
    _say(f" OpenMP max threads: {_threads()}")
    if fail == "missing_output":
        time.sleep(sleep)
        _say(" Modelling completed" if solver == "crmod" else " ***finished***")
        record(solver, settings.tag, "missing_output", _WRITTEN)
        return 0
    pid_file = f"{solver}.pid"
    _write_pid(pid_file)
    time.sleep(sleep)
    if fail == "hang":
        _hang()
    if fail == "exit":
        print(f"{name} stand-in: failure injected (fail = exit, status {settings.exit_code})", file=sys.stderr)
        return settings.exit_code
    try:
        _say(" Reading Input-Files")
        job = _Crmod() if solver == "crmod" else _Crtomo(iterations)
        job.load()
        if fail == "error_dat":
            path = job.rho if solver == "crmod" else job.volt
            raise SolverError(path, 3, "failure injected by the cr_queue stand-in")
        if solver == "crmod":
            _say(" Calculating Potentials")
            if fail in ("signal", "partial"):
                job.write_partial()
            else:
                job.write_outputs()
                _write_large(os.path.dirname(job.dvolt) or ".", settings.large, solver)
        else:
            job.start()
            last = 1 if fail in ("signal", "partial") else iterations
            for it in range(1, last + 1):
                _say(f" Iteration {it:3d} : Updating")
                job.iteration(it)
            if fail not in ("signal", "partial"):
                _write_large(job.inv, settings.large, solver)
                job.finish()
        if fail == "signal":
            _kill_self(settings.signal)
    except SolverError as err:
        _write_error_dat(solver, err)
        _WRITTEN.add("error.dat")
        print("STOP -1", file=sys.stderr)
        record(solver, settings.tag, "error_dat", _WRITTEN)
        return 0
    if solver == "crtomo":
        # The real CRMod never deletes crmod.pid; CRTomo does on success.
        os.remove(pid_file)
    _say(" Modelling completed" if solver == "crmod" else " ***finished***")
    record(solver, settings.tag, "partial" if fail == "partial" else "ok", _WRITTEN)
    return 0


def _entry(solver: str) -> int:
    try:
        return _run(solver)
    except UsageError as exc:
        print(f"stand-in {solver}: {exc} (fix exe/{SETTINGS_FILE} or CRH_STANDIN_*)", file=sys.stderr)
        return 2


def crmod_main() -> int:
    """Console script ``crh_standin_crmod``."""
    return _entry("crmod")


def crtomo_main() -> int:
    """Console script ``crh_standin_crtomo``."""
    return _entry("crtomo")


def main(argv: list[str] | None = None) -> int:
    """``python -m cr_queue.standin crmod|crtomo``, for environments without the console scripts."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in SOLVERS:
        print("usage: python -m cr_queue.standin crmod|crtomo  (run in the tomodir's exe/)", file=sys.stderr)
        return 2
    return _entry(args[0])


if __name__ == "__main__":
    sys.exit(main())
