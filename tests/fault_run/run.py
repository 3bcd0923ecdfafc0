"""Drive one fault run: batches of tomodirs added, run by a pool of workers under faults, retrieved, checked.

The main thread registers a batch, waits for the one before it to end and
brings it back; a fault thread meanwhile draws background faults (workers
killed, terminated, stopped; the database restarted or down; a worker's TCP
path frozen).  At the deadline the faults stop and are healed, every job is
waited for, everything retrieved, the workers stopped, and check.py's
invariants checked.  The seed is printed first, the summary line last.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..conftest import script
from . import check
from .plan import SWITCH_ENV, SWITCHABLE, Plan, switches_from, switches_from_env
from .world import World, WorkerRun

COMMAND_TRIES = 40


@dataclass
class Slot:
    """A place for a steady worker: its node's scratch, and whether it reaches the database through the proxy."""

    workdir: object
    through_proxy: bool
    worker: WorkerRun | None = None


@dataclass
class Tally:
    switches: frozenset = frozenset()
    counts: Counter = field(default_factory=Counter)
    longest_outage: float = 0.0
    longest_pause: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float = 0.0) -> None:
        with self.lock:
            self.counts[kind] += 1
            if kind == "db_outage":
                self.longest_outage = max(self.longest_outage, seconds)
            if kind in ("stop_cont_worker", "freeze_path"):
                self.longest_pause = max(self.longest_pause, seconds)

    def summary(self) -> str:
        c = self.counts
        parts = [
            f"{c['kill9_worker']} worker kills",
            f"{c['sigterm_worker']} SIGTERMs",
            f"{c['stop_cont_worker']} SIGSTOP/SIGCONTs",
            f"{c['db_outage']} database outages up to {self.longest_outage:.1f} s" if "db_outage" in self.switches else "database outages off",
            f"{c['db_restart']} database restarts" if "db_restart" in self.switches else "database restarts off",
            f"{c['freeze_path']} frozen TCP paths (pauses up to {self.longest_pause:.1f} s)",
            f"{c['kill9_add']} crh_add kills",
            f"{c['kill9_retrieve']} crh_retrieve kills",
            f"{c['quit_worker']} -q workers after a crash",
        ]
        for kind in ("concurrent_add", "concurrent_retrieve", "full_scratch"):
            if kind in self.switches:
                parts.append(f"{c[kind]} {kind.replace('_', ' ')}")
        return f"faults {sum(c.values())} ({', '.join(parts)})"


class FaultRun:
    def __init__(self, plan: Plan, say=print) -> None:
        self.plan = plan
        self.say = say
        self.world = World(plan)
        self.tally = Tally(plan.switches)
        self.stop_faults = threading.Event()
        self.slots: list[Slot] = []
        self.slots_lock = threading.Lock()
        self.notes: list[str] = []  # what went wrong on the way (commands that never succeeded)

    # ------------------------------------------------------------ driving

    def run(self) -> tuple[bool, str, list[check.Finding]]:
        plan, world = self.plan, self.world
        self.say(
            f"fault run: seed {plan.seed}, {plan.minutes:g} minutes, every fault kind"
            + (f" but {', '.join(sorted(set(SWITCHABLE) - plan.switches))} ({SWITCH_ENV})" if set(SWITCHABLE) - plan.switches else "")
            + "; "
            f"files in {world.home}"
        )
        try:
            world.start()
            self._start_pool()
            deadline = time.monotonic() + plan.minutes * 60
            faults = threading.Thread(target=self._faults, name="faults", daemon=True)
            faults.start()
            batch = 0
            self._add(batch)
            previous = batch
            left: list[int] = []  # batches not brought back yet
            while time.monotonic() < deadline:
                batch += 1
                self._add(batch)
                self._wait_ended(previous, deadline + 60)
                if not self._retrieve(previous, final=False):
                    left.append(previous)
                previous = batch
            left.append(previous)
            self.stop_faults.set()
            faults.join()
            self._heal()
            self._wait_ended(None, time.monotonic() + (120 if plan.short else 600))
            for b in left:
                self._retrieve(b, final=True)
            self._stop_pool()
            findings = check.check(world)
        finally:
            self.stop_faults.set()
            world.close()
        findings = [check.Finding("wrong", note) for note in self.notes] + findings
        kinds = Counter(f.kind for f in findings)
        ok = not [f for f in findings if f.kind != "known"]
        line = (
            f"{self.tally.summary()}, jobs {len(world.tomodirs)}: {kinds['lost']} lost, "
            f"{kinds['duplicated']} duplicated, {kinds['wrong']} wrong"
            + (f" ({kinds['known']} marks of defects whose kind was left out, not counted)" if kinds["known"] else "")
            + f": {'PASS' if ok else 'FAIL'}"
        )
        for f in findings:
            self.say(f"  {f}")
        if ok:
            world.remove()
        else:
            self.say(f"seed {plan.seed}: the run's files are kept in {world.home}")
        self.say(line)
        return ok, line, findings

    # ----------------------------------------------------------- the pool

    def _start_pool(self) -> None:
        for i in range(self.plan.workers):
            workdir = self.world.scratch / f"node{i}"
            workdir.mkdir()
            self.slots.append(Slot(workdir, through_proxy=(i == 1)))
        if "full_scratch" in self.plan.switches:
            self.slots.append(Slot(self.world.small_scratch(), through_proxy=False))
            self.tally.add("full_scratch")
        for slot in self.slots:
            slot.worker = self.world.start_worker(through_proxy=slot.through_proxy, workdir=slot.workdir)

    def _replace(self, slot: Slot) -> None:
        slot.worker = self.world.start_worker(through_proxy=slot.through_proxy, workdir=slot.workdir)

    def _maintain(self) -> None:
        """Restart a steady worker that ended by itself, as its service manager would (check.py reports it)."""
        with self.slots_lock:
            for slot in self.slots:
                w = slot.worker
                if w is not None and w.ended_by is None and w.proc.poll() is not None:
                    self.say(f"  {w.name} ended by itself (exit {w.proc.returncode}): restarted")
                    self._replace(slot)

    def _heal(self) -> None:
        """The end of the faults: everything running and reachable again, a full pool."""
        self.world.proxy.unfreeze()
        for w in self.world.workers:
            if w.stopped:
                self.world.signal_worker(w, signal.SIGCONT)
                w.stopped = False
        with self.world.db_lock:
            self.world.db_start()
        with self.slots_lock:
            for slot in self.slots:
                if slot.worker is None or slot.worker.proc.poll() is not None or slot.worker.ended_by is not None:
                    self._replace(slot)

    def _stop_pool(self) -> None:
        for w in self.world.workers:
            if w.proc.poll() is None:
                w.ended_by = w.ended_by or "final"
                self.world.signal_worker(w, signal.SIGTERM)
        for w in self.world.workers:
            try:
                w.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.notes.append(f"{w.name} did not stop within 180 s of SIGTERM (killed; its threads' stacks are in its log)")
                w.proc.send_signal(signal.SIGUSR1)  # faulthandler: where each thread waits
                time.sleep(1.0)
                w.proc.kill()
                w.proc.wait()

    # ---------------------------------------------------------- the faults

    def _faults(self) -> None:
        plan, world = self.plan, self.world
        while not self.stop_faults.wait(plan.gap_s()):
            self._maintain()
            kind = plan.background_fault()
            try:
                getattr(self, f"_fault_{kind}")(kind)
            except Exception as exc:  # noqa: BLE001 - a fault that could not be made is a note, not the end
                self.notes.append(f"fault {kind} could not be made: {type(exc).__name__}: {exc}")

    def _target(self) -> Slot | None:
        with self.slots_lock:
            # Only a worker that has started (registered, its signal handlers set):
            # a SIGTERM during Python's start-up would only test Python.
            live = [s for s in self.slots if s.worker is not None and s.worker.proc.poll() is None
                    and s.worker.ended_by is None and not s.worker.stopped and ") started:" in s.worker.log()]
        return self.plan.target(live) if live else None

    def _fault_kill9_worker(self, kind: str) -> None:
        w = self._end_one(kind, "kill9")
        if w is not None and self.plan.quit_worker_after_crash():
            with self.slots_lock:
                q = self.world.start_worker(quit_when_empty=True, workdir=w.workdir)
            self.tally.add("quit_worker")
            self.say(f"  fault: {q.name} started with -q after the crash")

    def _fault_sigterm_worker(self, kind: str) -> None:
        self._end_one(kind, "sigterm")

    def _end_one(self, kind: str, how: str) -> WorkerRun | None:
        """End a steady worker (kill -9, or SIGTERM: it drains) and put a new one in its place."""
        slot = self._target()
        if slot is None:
            return None
        w = slot.worker
        w.ended_by = how
        if how == "kill9":
            w.proc.kill()
            w.proc.wait()
        else:
            self.world.signal_worker(w, signal.SIGTERM)
        self.tally.add(kind)
        self.say(f"  fault: {'kill -9' if how == 'kill9' else 'SIGTERM'} {w.name}")
        with self.slots_lock:
            self._replace(slot)
        return w

    def _fault_stop_cont_worker(self, kind: str) -> None:
        slot = self._target()
        if slot is None:
            return
        w, pause = slot.worker, self.plan.pause_s(kind)
        w.stopped = True
        self.world.signal_worker(w, signal.SIGSTOP)
        self.tally.add(kind, pause)
        self.say(f"  fault: SIGSTOP {w.name} for {pause:.1f} s")
        self.stop_faults.wait(pause)
        self.world.signal_worker(w, signal.SIGCONT)
        w.stopped = False

    def _fault_db_restart(self, kind: str) -> None:
        mode = self.plan.db_stop_mode()
        with self.world.db_lock:
            self.world.db_stop(mode)
            self.world.db_start()
        self.tally.add(kind)
        self.say(f"  fault: database restarted ({mode})")

    def _fault_db_outage(self, kind: str) -> None:
        mode, seconds = self.plan.db_stop_mode(), self.plan.outage_s()
        with self.world.db_lock:
            self.world.db_stop(mode)
            self.say(f"  fault: database down ({mode}) for {seconds:.1f} s")
            time.sleep(seconds)  # not cut short by the end of the run: the outage is the fault
            self.world.db_start()
        self.tally.add(kind, seconds)

    def _fault_freeze_path(self, kind: str) -> None:
        pause = self.plan.pause_s()
        self.world.proxy.freeze()
        self.tally.add(kind, pause)
        self.say(f"  fault: TCP path of the proxied worker frozen for {pause:.1f} s")
        self.stop_faults.wait(pause)
        self.world.proxy.unfreeze()

    # ------------------------------------------------------------ commands

    def _add(self, batch: int) -> None:
        self.world.make_batch(batch)
        for directory, extra in self.world.batch_dirs(batch):
            args = [script("crh_add"), "--json", "--max-attempts", "1000", *extra, str(directory)]
            self._command(args, f"add-b{batch:03d}", self.plan.add_fault(), ok=lambda proc, doc: proc.returncode == 0)

    def _retrieve(self, batch: int, final: bool) -> bool:
        """Bring a batch back; True when all of it is (else the end of the run tries again)."""
        done = True
        for directory, _extra in self.world.batch_dirs(batch):
            args = [script("crh_retrieve"), "--json", str(directory)]
            done &= self._command(args, f"retrieve-b{batch:03d}", self.plan.retrieve_fault(), ok=_retrieved, note=final)
        return done

    def _command(self, args: list[str], name: str, fault: str, ok, note: bool = True) -> bool:
        """Run a command under its fault, then rerun it until it has done its work."""
        world = self.world
        if fault.startswith("kill9"):
            proc = world.command(args, name)
            after = self.plan.kill_after_s()
            try:
                proc.wait(timeout=after)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.tally.add(fault)
                self.say(f"  fault: kill -9 {name} after {after:.2f} s")
        elif fault.startswith("concurrent"):
            procs = [world.command(args, f"{name}-{i}") for i in (1, 2)]
            for proc in procs:
                proc.wait(timeout=600)
            self.tally.add(fault)
            self.say(f"  fault: two {name} at once (exit {[p.returncode for p in procs]})")
            for proc in procs:
                if "Traceback" in proc.err_path.read_text(errors="replace"):
                    self.notes.append(f"{name} run twice at once: one ended with a traceback ({proc.err_path.name})")
        for _ in range(COMMAND_TRIES):
            proc = world.command(args, name)
            proc.wait(timeout=900)
            doc = _json(proc)
            if "Traceback" in proc.err_path.read_text(errors="replace"):
                self.notes.append(f"{name} printed a traceback ({proc.err_path})")
            if ok(proc, doc):
                return True
            time.sleep(1.0)  # the database is down, or jobs still pending: again
        if note:
            self.notes.append(f"{name} never succeeded in {COMMAND_TRIES} runs (last: {proc.err_path})")
        return False

    def _wait_ended(self, batch: int | None, until: float) -> None:
        like = f"{self.world.tree}/b{batch:03d}%" if batch is not None else f"{self.world.tree}/%"
        while time.monotonic() < until:
            try:
                [(pending,)] = self.world.sql(
                    "SELECT count(*) FROM inversions WHERE source_path LIKE %s "
                    "AND status NOT IN ('finished', 'failed', 'cancelled')", (like,),
                )
                if pending == 0:
                    return
            except Exception:  # noqa: BLE001 - the database is down: a fault, wait on
                pass
            time.sleep(0.5)


def _json(proc) -> dict | None:
    try:
        return json.loads(proc.out_path.read_text())
    except (OSError, ValueError):
        return None


def _retrieved(proc, doc) -> bool:
    """Done: every job below the path was brought back (failed ones make exit 1)."""
    return proc.returncode in (0, 1) and doc is not None and not doc.get("pending") and not doc.get("problems")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fault-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed first)")
    parser.add_argument("--without", dest="left_out", default=None,
                        help=f"fault kinds to leave out while hunting a defect ({', '.join(sorted(SWITCHABLE))}); "
                             f"default: ${SWITCH_ENV}, else none")
    parser.add_argument("--short", action="store_true", help="the suite's sizes (smaller batches, shorter outages)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    try:
        switches = switches_from(args.left_out) if args.left_out is not None else switches_from_env()
    except ValueError as exc:
        parser.error(str(exc))
    plan = Plan(seed, args.minutes, switches, short=args.short)
    ok, _line, _findings = FaultRun(plan, say=lambda text: print(text, flush=True)).run()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
