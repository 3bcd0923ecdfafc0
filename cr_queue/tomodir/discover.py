"""Find the tomodirs below some directories that still need a solver run.

The rules follow what the solvers need and what they leave behind: a
tomodir (exe, config, rho, mod, inv) needs CRMod when its modelling inputs
are there and mod/volt.dat is not, and CRTomo when inv/inv.ctr does not end
with ``***finished***``. A tomodir that asks for a step whose inputs are
missing is reported, with the missing files, instead of being queued to
fail on a compute node hours later.

Discovery only reads: it runs in the user's tree, possibly on a read-only
mount, and must never leave a trace there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cr_queue.tomodir.walk import not_hidden, walk

TOMODIR_SUBDIRS = ("exe", "config", "rho", "mod", "inv")
CRMOD_CFG = "exe/crmod.cfg"
CRTOMO_CFG = "exe/crtomo.cfg"
VOLT = "mod/volt.dat"
INV_CTR = "inv/inv.ctr"
FINISHED = "***finished***"
MOD_INPUTS = ("grid/elem.dat", "grid/elec.dat", "config/config.dat", "rho/rho.dat", CRMOD_CFG)
INV_INPUTS = ("grid/elem.dat", "grid/elec.dat", CRTOMO_CFG)

_TAIL_BYTES = 8192


@dataclass(frozen=True)
class Tomodir:
    """A tomodir with work to do; a modelling+inversion job is one job."""

    path: Path
    needs_mod: bool
    needs_inv: bool

    @property
    def sim_type(self) -> str:
        return "inv" if self.needs_inv else "mod"

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(s for s, needed in (("mod", self.needs_mod), ("inv", self.needs_inv)) if needed)


@dataclass(frozen=True)
class Incomplete:
    """A tomodir that asks for a solver run it cannot get through."""

    path: Path
    missing: tuple[str, ...]

    @property
    def message(self) -> str:
        if set(self.missing) == {CRMOD_CFG, CRTOMO_CFG}:
            return (
                f"{self.path}: tomodir has no {CRMOD_CFG} or {CRTOMO_CFG}, so there is nothing to run; "
                "add the cfg of the solver you want, or leave the directory out"
            )
        return (
            f"{self.path}: tomodir is incomplete, missing {', '.join(self.missing)}; "
            "add the missing file(s) or leave the directory out"
        )


@dataclass(frozen=True)
class Done:
    """A tomodir whose results are already there."""

    path: Path


@dataclass
class Discovery:
    """Every tomodir below the paths, sorted by what it needs; each list in path order."""

    todo: list[Tomodir] = field(default_factory=list)  # a solver run to queue
    done: list[Path] = field(default_factory=list)  # its results are there already
    incomplete: list[Incomplete] = field(default_factory=list)  # asks for a run it cannot get through
    errors: list[str] = field(default_factory=list)  # a path or directory that could not be searched


def is_tomodir(path: Path) -> bool:
    return all(os.path.isdir(os.path.join(path, sub)) for sub in TOMODIR_SUBDIRS)


def inversion_finished(path: Path) -> bool:
    """Whether the last non-empty line of inv/inv.ctr starts with ***finished***.

    Only the tail is read: inv.ctr of a long inversion can be large.
    """
    try:
        with open(os.path.join(path, INV_CTR), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _TAIL_BYTES))
            tail = fh.read().decode("latin-1")
    except OSError:
        return False
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith(FINISHED)


def classify(path: Path) -> Tomodir | Incomplete | Done | None:
    """What a single directory needs; None when it is not a tomodir."""
    path = Path(path)
    if not is_tomodir(path):
        return None

    def missing(rels: Iterable[str]) -> list[str]:
        return [rel for rel in rels if not os.path.isfile(os.path.join(path, rel))]

    has_crmod = os.path.isfile(os.path.join(path, CRMOD_CFG))
    has_crtomo = os.path.isfile(os.path.join(path, CRTOMO_CFG))
    if not has_crmod and not has_crtomo:
        return Incomplete(path, (CRMOD_CFG, CRTOMO_CFG))

    has_volt = os.path.isfile(os.path.join(path, VOLT))
    needs_mod = has_crmod and not has_volt
    needs_inv = has_crtomo and not inversion_finished(path)
    absent: list[str] = []
    if needs_mod:
        absent += missing(MOD_INPUTS)
    if needs_inv:
        absent += missing(INV_INPUTS)
        if not has_volt and not has_crmod:
            absent.append(VOLT)
    if absent:
        return Incomplete(path, tuple(dict.fromkeys(absent)))
    if needs_mod or needs_inv:
        return Tomodir(path, needs_mod, needs_inv)
    return Done(path)


def _search(root: Path, found: list[Tomodir | Incomplete | Done], errors: list[str]) -> None:
    """Every tomodir below ``root``: the walk stops at each one (a tomodir's own
    subdirectories are not searched) and records it."""

    def descend(_rel: str, entry: os.DirEntry) -> bool:
        if not not_hidden(_rel, entry):
            return False
        result = classify(Path(entry.path))
        if result is not None:
            found.append(result)
        return result is None

    def unreadable(exc: OSError) -> None:
        errors.append(f"{exc.filename}: cannot read the directory ({exc.strerror}); fix its permissions or leave it out")

    for _entry in walk(root, descend=descend, onerror=unreadable):
        pass


def discover(paths: Iterable[Path]) -> Discovery:
    """Classify every tomodir at or below the given paths.

    Hidden directories are skipped (.git, .snapshot, our own temp dirs) and
    directory symlinks are not followed, so a link loop or a link to a
    shared data store cannot pull in unrelated work.
    """
    found: list[Tomodir | Incomplete | Done] = []
    result = Discovery()
    for given in paths:
        root = Path(os.path.abspath(given))
        if not os.path.exists(root):
            result.errors.append(f"{given}: no such directory; check the path")
            continue
        if not os.path.isdir(root):
            result.errors.append(
                f"{given}: is not a directory; give a tomodir or a directory that contains tomodirs"
            )
            continue
        direct = classify(root)
        if direct is None:
            _search(root, found, result.errors)
        else:
            found.append(direct)

    unique: dict[str, Tomodir | Incomplete | Done] = {}
    for item in found:
        unique.setdefault(os.path.realpath(item.path), item)
    for item in sorted(unique.values(), key=lambda i: i.path):
        if isinstance(item, Tomodir):
            result.todo.append(item)
        elif isinstance(item, Incomplete):
            result.incomplete.append(item)
        else:
            result.done.append(item.path)
    return result


def sipdir_of(tomodir: Path) -> Path | None:
    """The sipdir a tomodir is one frequency of (``SIPDIR/invmod/NN_freq``), if any."""
    parent = tomodir.parent
    if parent.name == "invmod" and (parent.parent / "frequencies.dat").is_file():
        return parent.parent
    return None
