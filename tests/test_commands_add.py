"""crh_add under real trouble (issue 14 defects 4, 9, 10; issue 19 item 4): a second crh_add
on the same tree, kill -9 and Ctrl-C, special files, a user login with --local."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from .conftest import run, script


def _jobs_per_tomodir(lab) -> dict[str, int]:
    return dict(lab.sql("SELECT source_path, count(*) FROM inversions GROUP BY 1"))


def test_a_second_crh_add_skips_what_a_running_one_registers_and_says_so(lab):
    tds = lab.tomodirs(3, cfg="sleep = 0")
    first = lab.run_until_paused([script("crh_add"), "--json", str(lab.tree)], "add:registered")

    second = run([script("crh_add"), "--json", str(lab.tree)], lab.env)
    out = json.loads(second.stdout)
    assert out["added"] == []
    skipped = {Path(s["path"]): s["reason"] for s in out["skipped"]}
    assert set(skipped) == set(tds)
    for reason in skipped.values():
        assert f"another crh_add (pid {first.pid} on " in reason, reason
        assert f"is registering the tomodirs in {lab.tree} at this moment; this one is left to it" in reason
    assert _jobs_per_tomodir(lab) == {str(tds[0]): 1}, "the second run made no job"

    first.kill()
    first.wait()
    third = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(Path(a["path"]) for a in third["added"]) == tds
    assert _jobs_per_tomodir(lab) == {str(td): 1 for td in tds}


def test_two_crh_add_at_once_register_each_tomodir_once(lab):
    tds = lab.tomodirs(30, cfg="sleep = 0")
    procs = [lab.spawn([script("crh_add"), "--json", str(lab.tree)]) for _ in range(2)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        outs.append(json.loads(stdout))
    assert _jobs_per_tomodir(lab) == {str(td): 1 for td in tds}
    added = [Path(a["path"]) for out in outs for a in out["added"]]
    assert sorted(added) == tds, "each tomodir was queued by exactly one of the two"
    for out in outs:
        for s in out["skipped"]:
            assert "another crh_add" in s["reason"] or "already registered" in s["reason"], s
    assert lab.sql("SELECT count(*) FROM inversions WHERE status <> 'queued'") == [(0,)]


def test_a_rerun_removes_the_temporary_crh_a_killed_crh_add_left(lab):
    [td] = lab.tomodirs(1, cfg="sleep = 0")
    add = lab.run_until_paused([script("crh_add"), "--json", str(lab.tree)], "add:control_tmp")
    add.kill()
    add.wait()
    [tmp] = [p for p in lab.tree.iterdir() if p.name.startswith(f".{td.name}.crh.") and p.name.endswith(".tmp")]
    unrelated = lab.tree / ".notes.crh.0123456789ab.tmp"  # not beside a tomodir of this run: the user's
    unrelated.write_text("mine")

    out = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert [Path(a["path"]) for a in out["added"]] == [td]
    assert not tmp.exists(), "the killed run's temporary .crh is gone"
    assert unrelated.read_text() == "mine"
    assert sorted(p.name for p in lab.tree.iterdir()) == sorted([td.name, f"{td.name}.crh", unrelated.name])
    assert _jobs_per_tomodir(lab) == {str(td): 1}


def test_special_files_are_named_as_what_they_are(lab, monkeypatch):
    [td] = lab.tomodirs(1, cfg="sleep = 0")
    os.mkfifo(td / "exe" / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(td / "exe")  # bound by a relative name: a socket's path may hold only 107 bytes
    sock.bind("sock")
    try:
        (td / "exe" / "outside").symlink_to("/etc/hostname")
        done = run([script("crh_add"), "--json", str(lab.tree)], lab.env, check=1)
    finally:
        sock.close()
    problems = json.loads(done.stdout)["problems"]
    text = "\n".join(problems)
    assert f"{td / 'exe' / 'pipe'}: a named pipe (FIFO) was not sent" in text
    assert f"{td / 'exe' / 'sock'}: a socket was not sent" in text
    assert f"{td / 'exe' / 'outside'}: a symlink pointing outside the tomodir was not sent" in text
    assert len(problems) == 3


def test_crh_add_local_under_a_user_login_refuses_before_registering_anything(lab):
    from psycopg import conninfo

    run([script("crh"), "db", "grant-user", "cmd_local_user"], lab.env)
    [td] = lab.tomodirs(1, cfg="sleep = 0")
    env = {**lab.env, "CRH_DATABASE_URL": conninfo.make_conninfo(lab.db_url, user="cmd_local_user")}
    done = run([script("crh_add"), "--local", str(lab.tree)], env, check=2)
    assert "Traceback" not in done.stderr
    assert "crh_add --local runs a worker" in done.stderr and "Nothing was registered" in done.stderr
    assert "crh db grant-worker cmd_local_user" in done.stderr
    assert lab.sql("SELECT count(*) FROM inversions") == [(0,)]
    assert not td.with_suffix(".crh").exists()
    # Without --local the same login registers the job for the pool.
    out = json.loads(run([script("crh_add"), "--json", str(lab.tree)], env).stdout)
    assert [Path(a["path"]) for a in out["added"]] == [td]


def test_ctrl_c_during_crh_add_says_what_was_queued_and_what_a_rerun_resumes(lab):
    tds = lab.tomodirs(6, cfg="sleep = 0")
    add = lab.run_until_paused([script("crh_add"), str(lab.tree)], "add:queuing")
    # Paused where uploads are done and their jobs are not claimable yet: nothing may say "queued".
    statuses = dict(lab.sql("SELECT source_path, status FROM inversions"))
    assert statuses and set(statuses.values()) == {"registering"}
    add.send_signal(signal.SIGINT)
    stdout, stderr = add.communicate(timeout=120)
    assert add.returncode == 130, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    assert "queued job" not in stdout, "no job was claimable, so none was said to be queued"
    left = {line.rsplit(": ", 1)[1] for line in stdout.splitlines() if line.startswith("left registering job ")}
    registering = {path for path, status in lab.sql("SELECT source_path, status FROM inversions") if status == "registering"}
    assert left == registering and left
    assert f"interrupted: 0 job(s) queued, {len(left)} left registering, {len(tds) - len(left)} not begun" in stderr
    assert "run crh_add again in the same tree: it resumes what was left" in stderr

    dry = run([script("crh_add"), "--dry-run", str(lab.tree)], lab.env).stdout
    with_crh = [td for td in tds if td.with_suffix(".crh").exists()]
    assert with_crh, "the paused run had written .crh files of jobs it had not queued"
    for td in with_crh:
        assert f"): {td}" in dry and "would resume job" in dry
    assert f"would queue {len(tds)} job(s) ({len(with_crh)} of them to be resumed)" in dry

    out = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(Path(a["path"]) for a in out["added"]) == tds
    assert sum(a["resumed"] for a in out["added"]) == len(with_crh)
    assert _jobs_per_tomodir(lab) == {str(td): 1 for td in tds}
    assert lab.sql("SELECT DISTINCT status FROM inversions") == [("queued",)]


def test_queued_is_printed_only_once_the_job_is_claimable(lab):
    tds = lab.tomodirs(4, cfg="sleep = 0")
    add = lab.spawn([script("crh_add"), str(lab.tree)])
    seen = 0
    for line in add.stdout:
        if line.startswith("queued job "):
            job_id = int(line.split()[2])
            assert lab.status(job_id) == "queued", line
            seen += 1
    add.wait()
    assert add.returncode == 0 and seen == len(tds)


def test_a_database_gone_as_crh_add_starts_its_threads_is_one_line_and_a_rerun_adds_all(lab, pg_cluster):
    # The short fault run (seed 369524) saw both of two crh_add at once end with
    # "RuntimeError: cannot join thread before it is started" when a restart came
    # between taking the tomodirs' locks and opening the connection of the threads.
    tds = lab.tomodirs(3, cfg="sleep = 0")
    go = lab.tmp_path / "go"
    add = lab.run_until_paused([script("crh_add"), "--json", str(lab.tree)], "add:locked", until=go)
    pg_cluster.stop()
    try:
        go.touch()
        _out, err = add.communicate(timeout=120)
    finally:
        pg_cluster.start()
    assert add.returncode == 2, err
    assert "Traceback" not in err and "cannot connect to the database" in err, err
    assert not [p for p in lab.tree.iterdir() if p.name.endswith(".crh") or p.name.endswith(".tmp")], "nothing written"
    out = json.loads(run([script("crh_add"), "--json", str(lab.tree)], lab.env).stdout)
    assert sorted(Path(a["path"]) for a in out["added"]) == tds
    assert _jobs_per_tomodir(lab) == {str(td): 1 for td in tds}
