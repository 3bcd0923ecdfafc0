"""Worker faults of issue 14, each reproduced for real before its fix.

Real crh_worker processes, the stand-in solvers (or tiny solver scripts in the
test's own directory), the suite's PostgreSQL stopped and started for real.
Waits are on events (a log line, a pid, a job's state), never on a sleep that
hopes something happened; the only sleep is the length of an outage itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from cr_queue.worker import daemon

from .conftest import run, script
from .faults import alive, small_tmpfs, solver_script, standin_alive, wait_for

OUTAGE_S = 15.0


def test_database_outage_longer_than_one_retry_is_ridden_out_and_no_result_is_lost(lab, pg_cluster):
    # Defect 1: when a reconnect itself failed, every slot died and the results were thrown away.
    ids = lab.add(*lab.tomodirs(4, cfg="sleep = 2"))
    workers = [lab.worker(f"w{i}", "--jobs", "2") for i in range(2)]
    solves = lab.wait_runs(4)

    pg_cluster.stop()
    down = time.monotonic()
    try:
        # The solvers end during the outage: their results must wait on the node.
        wait_for(lambda: not any(standin_alive(s.pid) for s in solves), "the solvers to finish during the outage")
        for w in workers:
            w.wait_log("connection lost")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))  # the outage itself
        assert all(w.proc.poll() is None for w in workers), [w.log() for w in workers]
    finally:
        pg_cluster.start()

    for job_id in ids:
        lab.wait_status(job_id, "finished", timeout=120)
    assert all(w.proc.poll() is None for w in workers), "a worker ended during the outage"
    results = [w.stop() for w in workers]
    lab.check_each_solved_once(workers, results, 4, "each job was solved once: no solver work was thrown away")
    for w in workers:
        assert "Traceback" not in w.log(), w.log()
    lab.check_invariants({i: "finished" for i in ids})


def test_a_worker_whose_database_goes_down_as_it_starts_waits_for_it(lab, pg_cluster, tmp_path):
    # Found by the short fault run (seed 265862): a worker started as the database went
    # down had its control connection open and its registration cut off ("server closed
    # the connection unexpectedly"); it exited 2, and a SLURM pilot has nobody to restart it.
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))
    go = tmp_path / "go"
    env = {**lab.env, "CRH_PAUSE_AT": daemon.PAUSE_CONNECTED, "CRH_PAUSE_UNTIL": str(go)}
    w = lab.worker("starting", "-q", env=env)
    w.wait_log(f"crh-paused {daemon.PAUSE_CONNECTED}")

    pg_cluster.stop()  # fast: the open control connection is cut off
    try:
        go.touch()
        w.wait_log("database unreachable while starting")
        w.wait_log("retrying in 1 s")  # a second attempt, refused too: it keeps trying
        assert w.proc.poll() is None, w.log()
    finally:
        pg_cluster.start()

    code, report = w.finish()
    assert code == 0 and report["finished"] == 1, (code, w.log())
    assert "Traceback" not in w.log(), w.log()
    assert len(lab.sql("SELECT id FROM workers")) == 1, "registered once"
    lab.check_invariants({job_id: "finished"})


def test_quit_when_empty_worker_started_after_a_crash_runs_the_lost_job(lab):
    # Defect 3: the -q worker's slots found nothing to claim before the first rescue
    # sweep, so it stopped ("queue empty") and left the crashed worker's job behind.
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 2"))
    crashed = lab.worker("crashed")
    [first] = lab.wait_runs(1)
    assert lab.status(job_id) == "running"
    crashed.kill9()

    code, report = lab.worker("pilot", "-q").finish()

    assert code == 0 and report["finished"] == 1, report
    job = lab.job(job_id)
    assert (job["status"], job["attempt"]) == ("finished", 2)
    assert lab.events(job_id) == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]
    assert len(lab.runs()) == 2 and not standin_alive(first.pid)
    lab.check_invariants({job_id: "finished"})


def test_a_path_too_long_for_the_scratch_dir_fails_that_job_and_stops_no_worker(lab):
    # Defect 2: ENAMETOOLONG under the worker's deeper scratch prefix counted as a node
    # failure: the job went back, the same worker took it again, and after 5 it exited 3.
    path_max = os.pathconf("/", "PC_PATH_MAX")
    long_td, fine_td = lab.tomodirs(2, cfg="sleep = 0")
    scratch = lab.workdir / ("s" * 250) / ("s" * 250)
    scratch.mkdir(parents=True)
    # Fits under the user's tree with room to spare, not under the scratch dir.
    room = path_max - 100 - len(str(long_td)) - len("/extra/") - len("/deep.dat")
    parts = [("d" * 200)] * (room // 201)
    deep = long_td.joinpath("extra", *parts)
    deep.mkdir(parents=True)
    (deep / "deep.dat").write_text("1\n")
    long_id, fine_id = lab.add(long_td, fine_td)

    code, report = lab.worker("w", "-q", "--workdir", str(scratch)).finish()

    assert code == 0, report
    assert report["failed"] == 1 and report["finished"] == 1 and report["released"] == 0, report
    job = lab.job(long_id)
    assert (job["status"], job["failure_category"], job["tries"]) == ("failed", "input_path", 1), job
    assert f"{long_td}/extra/" in job["failure_reason"] and "too long" in job["failure_reason"], job
    assert lab.events(long_id) == ["registering", "queued", "claimed", "failed"]
    wait_for(lambda: not list(scratch.iterdir()), "the job directories to be removed")
    lab.check_invariants({long_id: "failed", fine_id: "finished"})


def _node(tmp_path: Path, name: str) -> list[str]:
    """A worker's own scratch directory: with the host, what makes it a node of its own."""
    scratch = tmp_path / f"node-{name}"
    scratch.mkdir(exist_ok=True)
    return ["--workdir", str(scratch)]


def test_a_job_no_node_can_run_fails_as_node_failures_after_three_workers(lab, tmp_path):
    # Defect 2: node-failure releases are capped per job, counted over distinct nodes.
    broken = solver_script(tmp_path / "bin" / "CRMod", "exit 126")
    env = {**lab.env, "CRH_CRMOD": str(broken)}
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))
    workers = [lab.worker(name, *_node(tmp_path, name), env=env) for name in ("a", "b", "c")]

    job = lab.wait_status(job_id, "failed")

    assert job["failure_category"] == "node_failures", job
    assert "given back on 3 nodes" in job["failure_reason"], job["failure_reason"]
    for name in ("a", "b", "c"):
        assert f"{name} on " in job["failure_reason"] and f"node-{name} (" in job["failure_reason"], job["failure_reason"]
    assert "exit 126" in job["failure_reason"]
    assert lab.events(job_id) == ["registering", "queued"] + ["claimed", "released"] * 2 + ["claimed", "failed"]
    claimers = lab.sql("SELECT count(DISTINCT worker_id) FROM events WHERE job_id = %s AND event = 'claimed'", (job_id,))
    assert claimers == [(3,)]
    assert all(w.proc.poll() is None for w in workers), "one job took a worker down"
    results = [w.stop() for w in workers]
    assert [code for code, _ in results] == [0, 0, 0]
    lab.check_invariants({job_id: "failed"})


def test_workers_restarted_on_one_broken_node_count_as_one_node(lab, tmp_path):
    # Found by the long fault run (seed 2): three worker processes, one after the other on
    # the same full scratch (a replacement, -q pilots), each gave a large job back, and the
    # job failed as node_failures though no other node had tried it.
    broken = solver_script(tmp_path / "bin" / "CRMod", "exit 126")
    env = {**lab.env, "CRH_CRMOD": str(broken)}
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))
    for n in range(3):
        code, report = lab.worker(f"restarted{n}", "-q", *_node(tmp_path, "broken"), env=env).finish()
        assert code == 0 and report["released"] == 1 and report["failed"] == 0, report
        assert lab.status(job_id) == "queued"

    code, report = lab.worker("healthy", "-q", *_node(tmp_path, "healthy")).finish()
    assert code == 0 and report["finished"] == 1, report
    assert lab.events(job_id) == ["registering", "queued"] + ["claimed", "released"] * 3 + ["claimed", "finished"]
    lab.check_invariants({job_id: "finished"})


def test_a_worker_does_not_at_once_reclaim_a_job_it_gave_back(lab, tmp_path):
    # Defect 2: the job stayed at the head of the queue and the same worker took it again.
    broken = solver_script(tmp_path / "bin" / "CRMod", "exit 126")
    env = {**lab.env, "CRH_CRMOD": str(broken)}
    ids = lab.add(*lab.tomodirs(2, cfg="sleep = 0"))

    code, report = lab.worker("w", "--max-node-failures", "2", env=env).finish()

    assert code == 3 and report["released"] == 2, report
    for job_id in ids:
        assert lab.events(job_id) == ["registering", "queued", "claimed", "released"], lab.events(job_id)
    lab.check_invariants({i: "queued" for i in ids})


@pytest.fixture
def small_scratch(tmp_path):
    """A 8 MiB tmpfs as a worker's scratch directory (unmounted at teardown)."""
    with small_tmpfs(tmp_path / "small-scratch", "8m") as where:
        yield where


def test_a_solver_that_fills_the_scratch_disk_is_a_node_failure_not_a_result(lab, tmp_path, small_scratch):
    # Defect 7: the solver's output was cut short by the full disk, the solver exited 0,
    # and the truncated file was accepted as the result.
    solver = solver_script(
        tmp_path / "bin" / "CRMod",
        f'"{script("crh_standin_crmod")}" || exit $?\n'
        "dd if=/dev/zero of=../mod/big.dat bs=1M count=12 2>/dev/null\n"
        "exit 0",
    )
    env = {**lab.env, "CRH_CRMOD": str(solver)}
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))

    code, report = lab.worker("small", "-q", "--workdir", str(small_scratch), env=env).finish()

    assert code == 0 and report["finished"] == 0 and report["released"] == 1, report
    job = lab.job(job_id)
    assert (job["status"], job["tries"]) == ("queued", 0), job
    [(detail,)] = lab.sql("SELECT detail ->> 'reason' FROM events WHERE job_id = %s AND event = 'released'", (job_id,))
    assert "scratch filesystem" in detail and "full" in detail, detail
    assert not list(small_scratch.iterdir()), "the job directory was left on the full disk"

    # A worker with room runs it, and the result is whole.
    code, report = lab.worker("roomy", "-q", env=env).finish()
    assert code == 0 and report["finished"] == 1, report
    run([script("crh_retrieve"), "--json"], lab.env, cwd=lab.tree)
    [td] = [p for p in lab.tree.iterdir() if p.is_dir()]
    assert (td / "mod" / "big.dat").stat().st_size == 12 << 20
    lab.check_invariants({job_id: "finished"})


def test_jobs_too_large_for_a_small_scratch_do_not_take_the_node_out_of_the_fleet(lab, small_scratch):
    # Found by the long fault run (seed 303): the worker on the small scratch tmpfs claimed
    # large-output jobs one after the other; each filled the disk and was given back, five
    # node failures in a row made it exit 3 ("node broken"), which its unit does not restart,
    # though the disk was empty again once those jobs' directories were gone.  A job too
    # large for this scratch is not a broken node: the worker leaves those jobs to others
    # and runs the ones that fit.
    large = lab.tomodirs(5, cfg=f"sleep = 0\nlarge = {12 << 20}", prefix="large")
    small = lab.tomodirs(1, cfg="sleep = 0", prefix="small")
    large_ids = lab.add(*large)
    [small_id] = lab.add(*small)

    code, report = lab.worker("small", "-q", "--workdir", str(small_scratch)).finish()

    assert code == 0 and report["released"] == 5 and report["finished"] == 1, (code, report)
    assert lab.status(small_id) == "finished"
    for job_id in large_ids:
        assert lab.events(job_id) == ["registering", "queued", "claimed", "released"], lab.events(job_id)
    reasons = [r for (r,) in lab.sql("SELECT detail ->> 'reason' FROM events WHERE event = 'released'")]
    assert len(reasons) == 5 and all("scratch filesystem" in r and "full" in r for r in reasons), reasons
    assert not list(small_scratch.iterdir()), "job directories were left on the scratch disk"

    lab.check_invariants({**{i: "queued" for i in large_ids}, small_id: "finished"})


def test_a_scratch_still_full_without_the_jobs_files_is_a_broken_node(lab, small_scratch):
    # The other side of the rule above: something else fills the scratch filesystem, so
    # every job fails here whatever it is, and the node stops claiming.
    filler = small_scratch / "not-ours"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (7 << 20) + b"\0" * ((1 << 20) - (64 << 10)))
    ids = lab.add(*lab.tomodirs(2, cfg="sleep = 0"))

    code, report = lab.worker("full", "--max-node-failures", "2", "--workdir", str(small_scratch)).finish()

    assert code == 3 and report["released"] == 2 and report["finished"] == 0, (code, report)
    reasons = [r for (r,) in lab.sql("SELECT detail ->> 'reason' FROM events WHERE event = 'released'")]
    assert len(reasons) == 2 and all("scratch filesystem" in r or "No space left" in r for r in reasons), reasons
    assert sorted(p.name for p in small_scratch.iterdir()) == ["not-ours"]
    lab.check_invariants({i: "queued" for i in ids})


# A solver for two jobs at once on one small scratch: the first to start fills the disk
# and, once the other has failed to write, exits 0; the other fails to write while the
# disk is full, waits until the filler's
# directory is gone (the space is back), and exits 1 without a word about space.  Loops
# are bounded: a worker that never gets there makes the solver exit 3 and the test fail.
_FILL_AND_FAIL = """\
full() {{ set -- $(stat -f -c '%a %S' .); [ $(($1 * $2)) -lt 1048576 ]; }}
wait_until() {{ i=0; until "$@"; do i=$((i+1)); [ $i -gt 1200 ] && exit 3; sleep 0.05; done; }}
if mkdir "{role}" 2>/dev/null; then
    wait_until test -e "{role}/victim-started"
    dd if=/dev/zero of=../mod/big.dat bs=1M count=12 2>/dev/null
    wait_until test -e "{role}/victim-failed"
    exit 0
fi
touch "{role}/victim-started"
wait_until full
dd if=/dev/zero of=../mod/volt.dat bs=1M count=2 2>/dev/null && exit 4
touch "{role}/victim-failed"
wait_until eval '! full'
exit 1
"""


def test_a_solver_that_failed_on_a_full_scratch_is_a_node_failure_when_the_space_is_back(lab, tmp_path, small_scratch):
    # Found by the fault run (seed 1): two slots share a scratch filesystem; one job's large
    # output fills it, the other job's solver fails to write (exit 1) - and by the time its
    # slot looked, the filler's directory had been removed: "full when the solver ended" saw
    # room, and the job was failed as exit_code, its own fault, for ever.
    solver = solver_script(tmp_path / "bin" / "CRMod", _FILL_AND_FAIL.format(role=tmp_path / "filler-role"))
    env = {**lab.env, "CRH_CRMOD": str(solver)}
    job_ids = lab.add(*lab.tomodirs(2, cfg="sleep = 0"))

    code, report = lab.worker("small", "-q", "-j", "2", "--workdir", str(small_scratch), env=env).finish()

    assert code == 0 and report["finished"] == 0 and report["failed"] == 0 and report["released"] == 2, report
    for job_id in job_ids:
        job = lab.job(job_id)
        assert (job["status"], job["tries"]) == ("queued", 0), job
    reasons = sorted(
        r for (r,) in lab.sql("SELECT detail ->> 'reason' FROM events WHERE event = 'released' ORDER BY job_id")
    )
    assert any("was full when the solver ended" in r for r in reasons), reasons
    assert any("exited with status 1, while the scratch filesystem" in r for r in reasons), reasons
    assert not list(small_scratch.iterdir()), "job directories were left on the scratch disk"

    # Workers with room run both, as the jobs they are.
    code, report = lab.worker("roomy", "-q", "-j", "2").finish()
    assert code == 0 and report["finished"] == 2, report
    lab.check_invariants({job_id: "finished" for job_id in job_ids})


def _is_sleeper(pid: int) -> bool:
    try:
        return alive(pid) and Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"1000"]
    except OSError:
        return False


def test_a_solvers_detached_grandchild_is_gone_when_its_job_ends(lab, tmp_path):
    # Defect 8: a helper in a session of its own (setsid) escaped the process-group kill.
    pid_file = tmp_path / "grandchild.pid"
    solver = solver_script(
        tmp_path / "bin" / "CRMod",
        f'setsid sleep 1000 &\necho $! > "{pid_file}"\nexec "{script("crh_standin_crmod")}"',
    )
    env = {**lab.env, "CRH_CRMOD": str(solver)}
    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 0"))
    w = lab.worker("w", env=env)
    grandchild = None
    try:
        lab.wait_status(job_id, "finished")
        grandchild = int(pid_file.read_text())
        assert not _is_sleeper(grandchild), "the solver's detached grandchild outlived its job"
        assert w.proc.poll() is None
        code, report = w.stop()
        assert code == 0 and report["finished"] == 1
    finally:
        if grandchild is not None and _is_sleeper(grandchild):
            os.kill(grandchild, signal.SIGKILL)
    lab.check_invariants({job_id: "finished"})


def test_a_worker_stopped_past_its_lease_runs_its_own_rescued_job_again_without_a_dead_slot(lab):
    # Found by the fault run (seed 1, SIGSTOP past the lease): the stopped worker's job was
    # rescued; on SIGCONT its idle slot claimed the job again while the first slot still held
    # the old attempt, whose clean-up then removed the new attempt's entry: KeyError in the
    # second slot, a dead thread, and a worker that ended on an internal error.
    from cr_queue.queries import jobs

    [job_id] = lab.add(*lab.tomodirs(1, cfg="sleep = 20"))
    w = lab.worker("w", "--jobs", "2", "--lease", "3")
    [first] = lab.wait_runs(1)
    w.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: lab.sql("SELECT lease_expires < now() FROM inversions WHERE id = %s", (job_id,))[0][0],
                 "the stopped worker's lease to run out", timeout=30)
        with psycopg.connect(lab.db_url, autocommit=True) as conn:
            assert jobs.rescue(conn, jobs.Actor(), grace_s=60) == [(job_id, "queued")]
        assert standin_alive(first.pid), "the first attempt's solver still runs: the old slot still holds the job"
    finally:
        w.signal(signal.SIGCONT)

    try:
        job = lab.wait_status(job_id, "finished", timeout=60)
    except AssertionError:
        raise AssertionError(f"{lab.job(job_id)}\n{lab.events(job_id)}\n{w.log()}") from None
    assert job["attempt"] == 2
    assert w.proc.poll() is None, w.log()
    code, report = w.stop()
    assert code == 0 and report["finished"] == 1, (report, w.log())
    assert "Traceback" not in w.log() and "unexpected error" not in w.log(), w.log()
    assert lab.events(job_id) == ["registering", "queued", "claimed", "rescued", "claimed", "finished"]
    lab.check_invariants({job_id: "finished"})
