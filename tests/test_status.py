"""crh status (and crh_status) and crh show against real PostgreSQL and the real console scripts."""

from __future__ import annotations

import getpass
import json
import math
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from psycopg import conninfo

from cr_queue.queries import jobs, workers
from cr_queue.queries import roles
from cr_queue.tomodir import synth

from .conftest import run, script, sql_rows
from .faults import wait_for

HOST = socket.gethostname()

# The documented shape of `crh status --json` (docs/admin.md): scripts rely on these keys.
TOP_KEYS = {
    "format", "generated_at", "scope", "totals", "running", "failed", "queue_depth", "sipdirs", "workers", "estimate",
    "everyone",
}
TOTAL_KEYS = {"registering", "queued", "running", "finished", "failed", "cancelled", "total"}
RUNNING_JOB_KEYS = {
    "id", "username", "source_computer", "source_path", "sipdir", "job_group", "sim_type", "threads", "attempt",
    "tries", "max_attempts", "worker_id", "worker", "host", "started", "elapsed_s", "lease_expires",
}
FAILED_JOB_KEYS = {
    "id", "username", "source_computer", "source_path", "sipdir", "job_group", "sim_type", "attempt", "host",
    "exit_code", "failure_category", "failure_reason", "finished",
}
DEPTH_KEYS = {"username", "group", "queued", "running", "top_priority", "oldest_queued"}
SIPDIR_KEYS = {
    "sipdir", "source_computer", "username", "total", "done", "finished", "failed", "running", "queued", "cancelled",
    "retrieved", "added",
}
WORKER_KEYS = {
    "id", "name", "host", "pid", "version", "db_role", "state", "requested", "jobs", "threads", "cpus", "groups",
    "solvers", "started", "last_heartbeat", "heartbeat_age_s", "stopped", "stop_reason", "held",
}
ESTIMATE_KEYS = {"remaining_jobs", "median_runtime_s", "runtime_sample", "slots", "drain_s", "reason"}


def crh_status() -> list[str]:
    """The crh_status console script, or its entry point where the script is not installed yet."""
    found = shutil.which("crh_status")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'crh_status'; from cr_queue.cli.status import main; main()"]


def status(cli_env, *args, check=0, cwd=None) -> dict:
    return json.loads(run([script("crh"), "status", "--json", *args], cli_env, cwd=cwd, check=check).stdout)


def _live_worker(db_url, name="node-a", host="node07", slots=2, threads=1) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return workers.register_worker(
            conn, name=name, host=host, pid=4242, version="9.9", jobs=slots, threads=threads, groups=["g1"],
            solvers={"crtomo": {"path": "/opt/CRTomo", "sha256": "ab" * 32, "size": 10, "version": "CRTomo 1.2"}},
        )


def _run_as(db_url, job_ids, worker_id, host="node07", seconds_ago=120):
    sql_rows(
        db_url,
        "UPDATE inversions SET status = 'running', attempt = attempt + 1, tries = tries + 1, worker_id = %s, "
        "inv_computer = %s, datetime_started = now() - make_interval(secs => %s), "
        "lease_expires = now() + interval '1 min' WHERE id = ANY(%s)",
        (worker_id, host, seconds_ago, list(job_ids)),
    )


@pytest.fixture
def busy(tmp_path, cli_env, db_url):
    """A queue with every kind of line: finished, failed, queued in two groups, running on a live worker."""
    tree = tmp_path / "tree"
    synth.make_tree(tree / "done", n_mod=3)
    bad = synth.make_tomodir(tree / "done" / "bad", "mod")
    (bad / "exe" / "standin.cfg").write_text("fail = error_dat\n")
    run([script("crh_add")], cli_env, cwd=tree / "done")
    run([script("crh_worker"), "-q", "--name", "finisher"], cli_env)
    synth.make_tree(tree / "waiting", n_inv=3, seed=10)
    synth.make_tree(tree / "grouped", n_inv=2, seed=20)
    run([script("crh_add")], cli_env, cwd=tree / "waiting")
    run([script("crh_add"), "--group", "g1"], cli_env, cwd=tree / "grouped")
    # Runtimes the estimate can learn from: exactly 100 s each.
    sql_rows(db_url, "UPDATE inversions SET datetime_started = datetime_finished - interval '100 s' WHERE status = 'finished'")
    wid = _live_worker(db_url)
    running = [r[0] for r in sql_rows(db_url, "SELECT id FROM inversions WHERE status = 'queued' ORDER BY id LIMIT 2")]
    _run_as(db_url, running, wid)
    return {"tree": tree, "worker_id": wid, "running": running}


def test_json_shape_and_numbers(busy, cli_env, db_url):
    report = status(cli_env)
    assert set(report) == TOP_KEYS and report["format"] == 1
    assert report["everyone"] is None  # the test role sees every job: no separate anonymous totals
    assert report["scope"] == {"mine": False, "username": None, "host": None}
    t = report["totals"]
    assert set(t) == TOTAL_KEYS
    assert (t["finished"], t["failed"], t["running"], t["queued"], t["total"]) == (3, 1, 2, 3, 9)

    running = report["running"]
    assert running["count"] == running["listed"] == 2
    for job in running["jobs"]:
        assert set(job) == RUNNING_JOB_KEYS
        assert job["worker"] == "node-a" and job["host"] == "node07" and job["attempt"] == 1
        assert 100 <= job["elapsed_s"] < 600
    assert sorted(j["id"] for j in running["jobs"]) == busy["running"]

    failed = report["failed"]
    assert failed["count"] == 1 and failed["by_category"] == {"error_dat": 1}
    (job,) = failed["jobs"]
    assert set(job) == FAILED_JOB_KEYS and job["failure_reason"] and job["source_path"].endswith("bad")

    depth = {(d["username"], d["group"]): d for d in report["queue_depth"]}
    me = _login(db_url)  # the queue is grouped by login (db_role), as fair share is
    assert set(depth) == {(me, None), (me, "g1")}
    assert all(set(d) == DEPTH_KEYS for d in depth.values())
    assert depth[(me, None)]["queued"] + depth[(me, None)]["running"] == 3
    assert depth[(me, "g1")]["queued"] + depth[(me, "g1")]["running"] == 2

    workers = {w["name"]: w for w in report["workers"]["items"]}
    assert set(workers) == {"node-a", "finisher"}  # the finisher stopped minutes ago: still listed
    live = workers["node-a"]
    assert set(live) == WORKER_KEYS
    assert live["state"] == "running" and live["held"] == 2 and live["heartbeat_age_s"] < 60
    assert live["solvers"]["crtomo"]["version"] == "CRTomo 1.2"
    assert workers["finisher"]["state"] == "stopped" and workers["finisher"]["stop_reason"]
    assert (report["workers"]["live"], report["workers"]["stopped"]) == (1, 1)

    e = report["estimate"]
    assert set(e) == ESTIMATE_KEYS
    assert e["median_runtime_s"] == pytest.approx(100) and e["runtime_sample"] == 3
    assert e["slots"] == 2 and e["remaining_jobs"] == 5
    assert e["drain_s"] == pytest.approx(math.ceil(5 / 2) * 100)


def test_text_report_without_colour(busy, cli_env):
    out = run([script("crh"), "status"], cli_env).stdout
    assert "\x1b[" not in out  # NO_COLOR is set and stdout is not a terminal
    for text in ("jobs: 3 queued, 2 running, 3 finished, 1 failed", "running (2):", "node-a", "node07",
                 "failed, not yet retrieved (1: error_dat 1):", "queue by user and group:", "about 5 min 00 s to drain",
                 "workers (1 live", "CRTomo 1.2"):
        assert text in out, text
    env = {k: v for k, v in cli_env.items() if k != "NO_COLOR"}
    assert "\x1b[" not in run([script("crh"), "status"], env).stdout  # not a terminal: still no colour


def test_lists_are_bounded_with_a_count_of_the_rest(busy, cli_env, db_url):
    report = status(cli_env, "--limit", "1")
    assert report["running"]["count"] == 2 and report["running"]["listed"] == 1
    assert len(report["running"]["jobs"]) == 1
    assert "... and 1 more" in run([script("crh"), "status", "--limit", "1"], cli_env).stdout


def test_lost_worker_and_no_estimate_without_slots(busy, cli_env, db_url):
    sql_rows(db_url, "UPDATE workers SET last_heartbeat = now() - interval '10 min' WHERE id = %s", (busy["worker_id"],))
    report = status(cli_env)
    node = next(w for w in report["workers"]["items"] if w["name"] == "node-a")
    assert node["state"] == "lost" and report["workers"]["lost"] == 1 and report["workers"]["live"] == 0
    assert report["estimate"]["drain_s"] is None and "no live worker" in report["estimate"]["reason"]
    assert "cannot estimate: no live worker" in run([script("crh"), "status"], cli_env).stdout


def test_mine_shows_only_my_jobs_from_this_computer(busy, cli_env, db_url):
    sql_rows(db_url, "UPDATE inversions SET username = 'someone_else' WHERE status = 'finished'")
    sql_rows(db_url, "UPDATE inversions SET source_computer = 'other-ws' WHERE status = 'failed'")
    everyone = status(cli_env)
    mine = status(cli_env, "--mine")
    assert everyone["totals"]["total"] == 9
    assert mine["scope"] == {"mine": True, "username": getpass.getuser(), "host": HOST}
    assert mine["totals"]["total"] == 5 and mine["totals"]["finished"] == 0 and mine["totals"]["failed"] == 0
    assert mine["failed"]["jobs"] == []
    assert {d["username"] for d in mine["queue_depth"]} == {_login(db_url)}


def test_sipdir_is_one_line_with_k_of_n_done(tmp_path, cli_env, db_url):
    synth.make_sipdir(tmp_path / "sip", [1.0, 10.0, 100.0])
    synth.make_tree(tmp_path / "plain", n_mod=1)
    run([script("crh_add")], cli_env, cwd=tmp_path)
    ids = [r[0] for r in sql_rows(db_url, "SELECT id FROM inversions WHERE sipdir IS NOT NULL ORDER BY id")]
    assert len(ids) == 3
    sql_rows(db_url, "UPDATE inversions SET status = 'finished', result_sha256 = input_sha256, datetime_finished = now() WHERE id = ANY(%s)", (ids[:2],))
    report = status(cli_env)
    (sip,) = report["sipdirs"]["items"]
    assert set(sip) == SIPDIR_KEYS and report["sipdirs"]["count"] == 1
    assert (sip["total"], sip["done"], sip["queued"]) == (3, 2, 1)
    assert sip["sipdir"] == str(tmp_path / "sip")
    out = run([script("crh"), "status"], cli_env).stdout
    assert f"{tmp_path / 'sip'} ({getpass.getuser()}@{HOST}): 2 of 3 frequencies done, 1 queued" in out
    # Once every frequency is retrieved the sipdir drops off the list.
    sql_rows(db_url, "UPDATE inversions SET status = 'finished', result_sha256 = input_sha256, downloaded = true WHERE id = ANY(%s)", (ids,))
    assert status(cli_env)["sipdirs"] == {"count": 0, "listed": 0, "items": []}


def test_tree_mode_shows_each_crh_below_a_directory(tmp_path, cli_env, db_url):
    tree = tmp_path / "tree"
    synth.make_tree(tree / "a", n_mod=2)
    bad = synth.make_tomodir(tree / "b" / "bad", "mod")
    (bad / "exe" / "standin.cfg").write_text("fail = error_dat\n")
    run([script("crh_add")], cli_env, cwd=tree)
    run([script("crh_worker"), "-q"], cli_env)
    synth.make_tree(tree / "c", n_inv=1, seed=5)
    run([script("crh_add")], cli_env, cwd=tree)

    report = status(cli_env, "--tree", cwd=tree)
    assert set(report) == {"format", "roots", "entries", "counts", "problems"}
    assert report["counts"] == {"finished": 2, "failed": 1, "queued": 1} and report["problems"] == []
    by_file = {os.path.relpath(e["crh_file"], tree): e for e in report["entries"]}
    assert by_file["b/bad.crh"]["status"] == "failed" and by_file["b/bad.crh"]["failure_reason"]
    assert all(e["job_id"] for e in report["entries"])

    # A PATH alone means tree mode, for that directory only.
    sub = status(cli_env, str(tree / "a"))
    assert sub["counts"] == {"finished": 2}

    text = run([script("crh"), "status", "--tree"], cli_env, cwd=tree).stdout
    assert "4 .crh files: 1 failed, 2 finished, 1 queued" in text
    assert "b/bad.crh" in text

    # A damaged .crh and one naming a job this database does not know: reported, exit 1.
    (tree / "c" / "broken.crh").write_text("{not json")
    ghost = json.loads(next((tree / "a").rglob("*.crh")).read_text())
    ghost["job_id"] = 987654
    (tree / "c" / "ghost.crh").write_text(json.dumps(ghost))
    proc = run([script("crh"), "status", "--tree"], cli_env, cwd=tree, check=1)
    assert "broken.crh" in proc.stderr and "job 987654 is not in this database" in proc.stderr
    report = status(cli_env, "--tree", cwd=tree, check=1)
    assert report["counts"]["unreadable"] == 1 and report["counts"]["unknown"] == 1


def _watch_until(args, env, drawn, what, timeout=120.0):
    """Run a --watch command until ``drawn(text so far)`` holds, then Ctrl-C it; returns its stdout.

    Synchronised on what it printed, not on a sleep: on a loaded machine a
    redraw may take seconds, and the test waits for it rather than failing."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: drawn("".join(lines)) or proc.poll() is not None, what, timeout)
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=60)
        reader.join(timeout=60)
    assert proc.returncode == 0, err
    return "".join(lines)


def test_watch_redraws_until_interrupted(busy, cli_env):
    # The third heading has appeared: the first two blocks are whole.
    out = _watch_until(
        [script("crh"), "status", "--watch", "0.5"], cli_env,
        lambda text: text.count("cr_queue status at") >= 3, "three redraws of crh status --watch",
    )
    assert out.count("cr_queue status at") >= 2  # plain repeated blocks: stdout is not a terminal
    assert "\x1b[2J" not in out

    out = _watch_until(
        [script("crh"), "status", "--watch", "0.5", "--json"], cli_env,
        lambda text: text.count("\n") >= 2, "two JSON documents from crh status --watch --json",
    )
    docs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(docs) >= 2 and all(set(d) == TOP_KEYS for d in docs)


def test_a_scientist_sees_own_jobs_and_everyone_else_only_as_numbers(tmp_path, cli_env, db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name in ("st_alice", "st_bob"):
            roles.grant(conn, name, roles.USER)
    alice, bob = ({**cli_env, "CRH_DATABASE_URL": conninfo.make_conninfo(db_url, user=n)} for n in ("st_alice", "st_bob"))
    synth.make_tree(tmp_path / "a", n_mod=2)
    synth.make_tree(tmp_path / "b", n_mod=3, seed=7)
    run([script("crh_add")], alice, cwd=tmp_path / "a")
    run([script("crh_add"), "--group", "g2"], bob, cwd=tmp_path / "b")
    report = status(alice)
    assert report["totals"]["total"] == report["totals"]["queued"] == 2
    assert sum(d["queued"] for d in report["queue_depth"]) == 2
    assert report["everyone"]["totals"]["queued"] == report["everyone"]["totals"]["total"] == 5
    assert {(r["status"], r["group"], r["jobs"]) for r in report["everyone"]["by_group"]} == {
        ("queued", None, 2), ("queued", "g2", 3)
    }
    assert report["estimate"]["remaining_jobs"] == 5  # the whole queue drains, not only hers
    text = run([script("crh"), "status"], alice).stdout
    assert "whole queue (every user; you see only your own jobs): 5 queued" in text
    assert str(tmp_path / "b") not in json.dumps(report)  # no names or paths of others


def _read_pty(args, env, enough, timeout: float = 120.0) -> str:
    """Run with stdout on a pseudo-terminal until ``enough(text drawn)`` holds, then Ctrl-C; returns what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, env=env, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while not enough(b"".join(chunks).decode(errors="replace")):
        assert time.monotonic() < deadline and proc.poll() is None, (
            f"{args} drew only {b''.join(chunks)!r} (exit {proc.poll()})"
        )
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunks.append(os.read(master, 65536))
            except OSError:
                break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    while select.select([master], [], [], 0.2)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.read()
    return b"".join(chunks).decode(errors="replace")


def _redrawn(times: int):
    """Enough of a terminal watch: ``times`` screens cleared, and the one before the last whole."""
    return lambda text: text.count("\x1b[2J") >= times and "Ctrl-C to stop" in text


def test_on_a_terminal_watch_redraws_in_place_and_colour_follows_no_color(busy, cli_env):
    env = {k: v for k, v in cli_env.items() if k != "NO_COLOR"}
    drawn = _read_pty([script("crh"), "status", "--watch", "0.5"], env, _redrawn(3))
    assert drawn.count("\x1b[H\x1b[2J") >= 2 and "Ctrl-C to stop" in drawn
    assert "\x1b[1m" in drawn  # bold headings: a terminal, NO_COLOR unset
    plain = _read_pty([script("crh"), "status", "--watch", "0.5"], cli_env, _redrawn(3))  # NO_COLOR=1
    assert plain.count("\x1b[2J") >= 2 and "\x1b[1m" not in plain and "\x1b[3" not in plain


def test_crh_status_script_and_errors(busy, cli_env, tmp_path):
    proc = subprocess.run(crh_status() + ["--json"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == TOP_KEYS
    env = {**cli_env, "CRH_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"}
    proc = run([script("crh"), "status"], env, check=2)
    assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    run([script("crh"), "status", "--tree", "--mine"], cli_env, check=2)
    run([script("crh"), "status", "--quiet"], cli_env)


# ----------------------------------------------------------------------- show


def test_show_prints_fields_and_whole_history(tmp_path, cli_env, db_url):
    td = synth.make_tree(tmp_path, n_mod=1)[0]
    run([script("crh_add"), "--threads", "2"], cli_env, cwd=tmp_path)
    run([script("crh_worker"), "-q", "--name", "w-show"], cli_env)
    (job_id,) = [r[0] for r in sql_rows(db_url, "SELECT id FROM inversions")]

    report = json.loads(run([script("crh"), "show", str(job_id), "--json"], cli_env).stdout)
    assert report["problems"] == []
    (job,) = report["jobs"]
    assert job["id"] == job_id and job["status"] == "finished" and job["source_path"] == str(td)
    assert job["worker_name"] == "w-show" and job["input_size"] > 0 and job["result_size"] > 0
    events = job["events"]
    assert [e["event"] for e in events] == ["registering", "queued", "claimed", "finished"]
    for e in events:
        assert e["db_role"] and e["os_user"] == getpass.getuser() and e["host"] == HOST and e["pid"]
        assert e["datetime"]
    assert events[0]["pid"] != events[2]["pid"]  # crh_add, then the worker process
    assert events[2]["worker_name"] == events[3]["worker_name"] == "w-show"
    assert events[3]["detail"]["threads"] == 2 and events[3]["detail"]["solvers"]

    # By tomodir and by .crh file: the same job; the text names who, where, what and when.
    for target in (str(td), str(td) + ".crh"):
        text = run([script("crh"), "show", target], cli_env).stdout
        assert f"job {job_id}: finished" in text and "history (4 events):" in text
        assert "worker w-show" in text and f"by {getpass.getuser()} (role " in text and f"on {HOST} pid" in text
        assert "solvers:" in text


def test_show_unknown_job(cli_env, tmp_path):
    proc = run([script("crh"), "show", "424242"], cli_env, check=1)
    assert "job 424242: not in the database" in proc.stderr
    proc = run([script("crh"), "show", str(tmp_path / "nope")], cli_env, check=2)
    assert "neither a job id nor an existing path" in proc.stderr


def _login(db_url: str) -> str:
    """The database login the commands of these tests use: what crh status groups the queue by."""
    return psycopg.conninfo.conninfo_to_dict(db_url)["user"]
