"""What a fault run does, drawn from one seed: the same seed gives the same plan.

The timing of real processes is not reproducible, so a rerun with the same
seed makes the same tree and draws the same faults in the same order, not the
same interleaving; the seed is printed first so a failing run can be rerun.

Every fault kind is injected.  While hunting one defect, a run can leave
some of the kinds below out (``--without KIND,...`` or
``CRH_FAULT_RUN_WITHOUT=KIND,...``); by default none is left out.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

# Fault kinds a run can leave out (each found a defect of issue 14, now fixed); all are on by default.
SWITCHABLE = {
    "db_restart": "the database restarted (stop fast or immediate, start at once): a reconnect fails while it starts (defect 1)",
    "db_outage": "the database stopped for 0.1-60 s: longer than one reconnect (defect 1)",
    "concurrent_add": "a second crh_add on the same tree at the same time (defect 4)",
    "concurrent_retrieve": "a second crh_retrieve on the same tree at the same time (defect 5)",
    # Not a fault of its own: kill -9 of crh_add is always injected, but the
    # .NAME.crh.XXXX.tmp it leaves in the user's tree (defect 10) is counted
    # only when this is on; left out, each is printed as known and not counted.
    "add_tmp_left": "count the .NAME.crh.XXXX.tmp files a killed crh_add leaves in the tree (defect 10)",
    # Found by the long run (seed 1): a worker SIGSTOPped past its lease rescues
    # its own job on SIGCONT and claims it again in another slot; the first
    # slot's clean-up removes the second's entry (KeyError), the slot thread
    # dies and the worker later exits 0.  Left out, SIGSTOPs stay within a lease.
    "stop_past_lease": "SIGSTOP of a worker for longer than its lease (the KeyError in the worker's slot clean-up)",
    "full_scratch": "a worker whose scratch filesystem is a small tmpfs that large outputs fill (defects 6 and 7)",
}
SWITCH_ENV = "CRH_FAULT_RUN_WITHOUT"

# (name, stand-in settings, expected status, expected failure_category, weight)
BEHAVIOURS = (
    ("ok", {}, "finished", None, 40),
    ("large", {"large": None}, "finished", None, 6),
    ("error_dat", {"fail": "error_dat"}, "failed", "error_dat", 8),
    ("missing_output", {"fail": "missing_output"}, "failed", "output_missing", 8),
    ("exit", {"fail": "exit", "exit_code": None}, "failed", "exit_code", 8),
    ("signal", {"fail": "signal", "signal": None}, "failed", "signal", 8),
    ("hang", {"fail": "hang"}, "failed", "timeout", 4),
)
SIGNALS = ("KILL", "TERM", "SEGV", "ABRT", "BUS")
KINDS = ("mod", "inv", "both")

# Background faults, drawn during the run: (kind, weight).
BACKGROUND = (
    ("kill9_worker", 6),
    ("sigterm_worker", 3),
    ("stop_cont_worker", 4),
    ("db_restart", 3),
    ("db_outage", 5),
    ("freeze_path", 3),
)


def switches_from(text: str | None) -> frozenset[str]:
    """The optional kinds a run injects: all but those ``text`` leaves out (``kind,kind``,
    from --without or the environment); unknown names are an error."""
    names = {n.strip() for n in (text or "").split(",") if n.strip()}
    unknown = names - set(SWITCHABLE)
    if unknown:
        raise ValueError(f"unknown fault kind(s) {sorted(unknown)}: those a run can leave out are {sorted(SWITCHABLE)}")
    return frozenset(SWITCHABLE) - names


def switches_from_env() -> frozenset[str]:
    return switches_from(os.environ.get(SWITCH_ENV))


@dataclass
class Behaviour:
    """One tomodir's stand-in behaviour and what its job must end as."""

    name: str
    kind: str
    settings: dict[str, str]
    status: str
    category: str | None


@dataclass
class Plan:
    seed: int
    minutes: float
    switches: frozenset[str] = frozenset()
    short: bool = False
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        # One stream per thread of the run, so the tree, the background faults
        # and the commands' faults each come out the same for the same seed,
        # however the threads interleave.
        self.rng = random.Random(f"{self.seed}:tree")
        self.fault_rng = random.Random(f"{self.seed}:faults")
        self.command_rng = random.Random(f"{self.seed}:commands")
        # Every enabled kind comes once first (in an order of the seed's), so a
        # short run injects each of them; then they are drawn by weight.
        self._first = [k for k, _ in BACKGROUND if k not in SWITCHABLE or k in self.switches]
        self.fault_rng.shuffle(self._first)
        self._first_add = True
        self._first_retrieve = True
        self._first_crash = True

    # -------------------------------------------------------------- sizes

    @property
    def workers(self) -> int:
        return 3

    @property
    def batch_size(self) -> int:
        return 16 if self.short else 40

    @property
    def lease_s(self) -> float:
        return 6.0

    @property
    def timeout_s(self) -> int:
        """The --timeout of the hanging tomodirs' crh_add."""
        return 4

    @property
    def outage_max_s(self) -> float:
        return 12.0 if self.short else 60.0

    @property
    def scratch_bytes(self) -> int:
        return 6 << 20

    # ---------------------------------------------------------- the tree

    def behaviour(self) -> Behaviour:
        weights = [b[4] for b in BEHAVIOURS]
        name, settings, status, category, _ = self.rng.choices(BEHAVIOURS, weights)[0]
        values = {}
        for key, value in settings.items():
            if key == "large":
                # Beyond the small scratch filesystem (the full_scratch kind).
                value = self.rng.choice((2 << 20, 4 << 20, 9 << 20))
            elif key == "exit_code":
                value = self.rng.choice((1, 2, 3, 77, 255))
            elif key == "signal":
                value = self.rng.choice(SIGNALS)
            values[key] = str(value)
        values["sleep"] = f"{self.rng.uniform(0.1, 1.5):.2f}"
        return Behaviour(name, self.rng.choice(KINDS), values, status, category)

    # ------------------------------------------------------------ faults

    def enabled(self) -> list[str]:
        """Every fault kind this plan injects."""
        kinds = [k for k, _ in BACKGROUND if k not in SWITCHABLE or k in self.switches]
        kinds += ["kill9_add", "kill9_retrieve", "quit_worker"]
        return kinds + sorted(k for k in ("concurrent_add", "concurrent_retrieve", "full_scratch") if k in self.switches)

    def background_fault(self) -> str:
        if self._first:
            return self._first.pop()
        kinds = [(k, w) for k, w in BACKGROUND if k not in SWITCHABLE or k in self.switches]
        return self.fault_rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]

    def gap_s(self) -> float:
        """Seconds until the next background fault."""
        return self.fault_rng.uniform(1.0, 5.0)

    def outage_s(self) -> float:
        return self.fault_rng.uniform(0.1, self.outage_max_s)

    def pause_s(self, kind: str = "freeze_path") -> float:
        """How long a worker stays SIGSTOPped or a TCP path frozen: around a lease."""
        if kind == "stop_cont_worker" and "stop_past_lease" not in self.switches:
            return self.fault_rng.uniform(1.0, 0.8 * self.lease_s)
        return self.fault_rng.uniform(1.0, 2.5 * self.lease_s)

    def quit_worker_after_crash(self) -> bool:
        first, self._first_crash = self._first_crash, False
        return first or self.fault_rng.random() < 0.4

    def db_stop_mode(self) -> str:
        return self.fault_rng.choice(("fast", "immediate"))

    def target(self, items):
        """The worker a fault hits."""
        return self.fault_rng.choice(list(items))

    def add_fault(self) -> str:
        """How a batch is registered: plain, killed mid-run then rerun, or twice at once."""
        kinds = ["plain", "kill9_add", "kill9_add"]
        if "concurrent_add" in self.switches:
            kinds.append("concurrent_add")
        first, self._first_add = self._first_add, False
        return kinds[-1] if first else self.command_rng.choice(kinds)

    def retrieve_fault(self) -> str:
        kinds = ["plain", "kill9_retrieve", "kill9_retrieve"]
        if "concurrent_retrieve" in self.switches:
            kinds.append("concurrent_retrieve")
        first, self._first_retrieve = self._first_retrieve, False
        return kinds[-1] if first else self.command_rng.choice(kinds)

    def kill_after_s(self) -> float:
        return self.command_rng.uniform(0.05, 1.5)
