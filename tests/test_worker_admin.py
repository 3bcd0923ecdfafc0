"""The worker registry and remote control: crh worker list|drain|stop, crh node set|list|unset.

The requests go through the database; a real crh_worker daemon obeys them.
`crh worker` itself still runs the daemon when given no subcommand.
"""

from __future__ import annotations

import json
import subprocess

import psycopg
from psycopg import conninfo

from cr_queue.queries import jobs, workers
from cr_queue.queries import roles
from cr_queue.tomodir import synth

from .conftest import run, script, sql_rows
from .faults import wait_for


def _worker(db_url, name, host="node07", **kw) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return workers.register_worker(
            conn, name=name, host=host, pid=kw.get("pid", 100), version="0.1.0", jobs=kw.get("jobs", 2),
            threads=kw.get("threads", 4), groups=kw.get("groups", []),
            solvers={"crtomo": {"path": "/opt/bin/CRTomo", "sha256": "cd" * 32, "size": 1}},
        )


def _requested(db_url) -> dict[str, str | None]:
    return {name: req for name, req in sql_rows(db_url, "SELECT name || '#' || id, requested FROM workers ORDER BY id")}



def test_worker_list(cli_env, db_url):
    a = _worker(db_url, "a", groups=["g1"])
    b = _worker(db_url, "b", host="node08")
    old = _worker(db_url, "old")
    with psycopg.connect(db_url, autocommit=True) as conn:
        workers.stop_worker(conn, old, "queue empty")
    sql_rows(db_url, "UPDATE workers SET datetime_stopped = now() - interval '2 hours' WHERE id = %s", (old,))
    report = json.loads(run([script("crh"), "worker", "list", "--json"], cli_env).stdout)
    listed = {w["id"]: w for w in report["workers"]}
    assert set(listed) == {a, b}
    assert listed[a]["groups"] == ["g1"] and listed[a]["solvers"]["crtomo"]["path"] == "/opt/bin/CRTomo"
    assert listed[a]["jobs"] == 2 and listed[a]["threads"] == 4 and listed[a]["held"] == 0
    assert listed[b]["host"] == "node08" and listed[b]["state"] == "running"
    everyone = json.loads(run([script("crh"), "worker", "list", "--all", "--json"], cli_env).stdout)
    assert {w["id"] for w in everyone["workers"]} == {a, b, old}
    text = run([script("crh"), "worker", "list"], cli_env).stdout
    assert "node08" in text and "/opt/bin/CRTomo" in text and "2x4" in text and "old" not in text.split()


def test_drain_and_stop_set_the_request(cli_env, db_url):
    a = _worker(db_url, "a")
    b1 = _worker(db_url, "b")
    b2 = _worker(db_url, "b", host="node09")  # a name reused by two workers reaches both
    c = _worker(db_url, "c", host="node10")
    gone = _worker(db_url, "gone")
    with psycopg.connect(db_url, autocommit=True) as conn:
        workers.stop_worker(conn, gone, "queue empty")

    report = json.loads(run([script("crh"), "worker", "drain", "a", "b", "--json"], cli_env).stdout)
    assert {w["id"] for w in report["changed"]} == {a, b1, b2} and report["problems"] == []
    assert _requested(db_url) == {f"a#{a}": "drain", f"b#{b1}": "drain", f"b#{b2}": "drain", f"c#{c}": None, f"gone#{gone}": None}

    # stop overrides drain; a later drain never softens a stop.
    out = run([script("crh"), "worker", "stop", str(a)], cli_env).stdout
    assert f"asked worker a (id {a}) on node07 to stop" in out
    report = json.loads(run([script("crh"), "worker", "drain", str(a), "--json"], cli_env).stdout)
    assert report["changed"] == [] and report["unchanged"][0]["why"] == "already asked to stop"
    assert _requested(db_url)[f"a#{a}"] == "stop"

    # By host.
    run([script("crh"), "worker", "stop", "--host", "node10"], cli_env)
    assert _requested(db_url)[f"c#{c}"] == "stop"

    # Unknown and stopped workers: reported, exit 1, nothing else changes.
    proc = run([script("crh"), "worker", "stop", "nosuch", "gone"], cli_env, check=1)
    assert "no worker with id or name 'nosuch'" in proc.stderr and "'gone' has already stopped" in proc.stderr
    assert _requested(db_url)[f"gone#{gone}"] is None
    proc = run([script("crh"), "worker", "drain"], cli_env, check=2)
    assert "name the workers to drain" in proc.stderr


def _told_while_running(daemon, cli_env, db_url, command, name):
    """Starts the worker command line `daemon`, and once one job runs tells it
    `crh worker <command> <name>`; the worker must then exit 0. Returns its --json report."""
    proc = subprocess.Popen(daemon, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sql_rows(db_url, "SELECT count(*) FROM inversions WHERE status = 'running'")[0][0] == 1, "a running job")
        run([script("crh"), "worker", command, name], cli_env)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return json.loads(out)


def test_a_real_worker_obeys_drain_and_stop(tmp_path, cli_env, db_url):
    for td in synth.make_tree(tmp_path, n_inv=2):
        (td / "exe" / "standin.cfg").write_text("sleep = 3\n")
    run([script("crh_add")], cli_env, cwd=tmp_path)

    # `crh worker` with options and no subcommand is still the daemon.
    daemon = [script("crh"), "worker", "--name", "node-a", "--jobs", "1", "--poll", "0.5", "--json"]
    report = _told_while_running(daemon, cli_env, db_url, "drain", "node-a")
    assert report["finished"] == 1  # the running job finished, the other was not claimed
    assert sql_rows(db_url, "SELECT count(*) FROM inversions WHERE status = 'queued'")[0][0] == 1
    assert sql_rows(db_url, "SELECT state FROM workers WHERE name = 'node-a'")[0][0] == "stopped"

    for td in tmp_path.rglob("standin.cfg"):
        td.write_text("sleep = 60\n")
    daemon = [script("crh_worker"), "--name", "node-b", "--poll", "0.5", "--json"]
    assert _told_while_running(daemon, cli_env, db_url, "stop", "node-b")["released"] == 1
    assert sql_rows(db_url, "SELECT count(*) FROM inversions WHERE status = 'queued'")[0][0] == 1


def test_crh_worker_is_still_the_daemon(tmp_path, cli_env, db_url):
    synth.make_tree(tmp_path, n_mod=2)
    run([script("crh_add")], cli_env, cwd=tmp_path)
    out = json.loads(run([script("crh"), "worker", "-q", "--jobs", "2", "--json"], cli_env).stdout)
    assert out["finished"] == 2
    helptext = run([script("crh"), "worker", "--help"], cli_env).stdout
    assert "--jobs" in helptext and "drain" in helptext and "stop" in helptext
    proc = run([script("crh"), "worker", "frobnicate"], cli_env, check=2)
    assert "No such command" in proc.stderr


def test_node_settings(cli_env, db_url):
    row = json.loads(run([script("crh"), "node", "set", "node07", "--nice", "10", "--cpus", "8", "--json"], cli_env).stdout)["node"]
    assert (row["host"], row["nice"], row["cpus"], row["threads"], row["active"]) == ("node07", 10, 8, None, True)
    # Only the values given change.
    out = run([script("crh"), "node", "set", "node07", "--threads", "2", "--inactive"], cli_env).stdout
    assert out.strip() == "node07: inactive, nice 10, cpus 8, threads 2"
    run([script("crh"), "node", "set", "node08", "--active"], cli_env)
    _worker(db_url, "w", host="node07")
    nodes = json.loads(run([script("crh"), "node", "list", "--json"], cli_env).stdout)["nodes"]
    assert [(n["host"], n["active"], n["live_workers"]) for n in nodes] == [("node07", False, 1), ("node08", True, 0)]
    assert sql_rows(db_url, "SELECT nice, cpus, threads, active FROM node_settings WHERE host = 'node07'") == [(10, 8, 2, False)]
    text = run([script("crh"), "node", "list"], cli_env).stdout
    assert "node07" in text and "HOST" in text
    # Clearing single values, then the whole row.
    row = json.loads(run([script("crh"), "node", "unset", "node07", "--cpus", "--json"], cli_env).stdout)["node"]
    assert (row["nice"], row["cpus"], row["threads"]) == (10, None, 2)
    run([script("crh"), "node", "unset", "node07"], cli_env)
    assert sql_rows(db_url, "SELECT host FROM node_settings") == [("node08",)]
    proc = run([script("crh"), "node", "unset", "node07"], cli_env, check=1)
    assert "no settings stored for host 'node07'" in proc.stderr
    proc = run([script("crh"), "node", "set", "node07", "--nice", "25"], cli_env, check=2)
    assert "--nice" in proc.stderr


def test_only_admins_change_workers_and_nodes(cli_env, db_url):
    a = _worker(db_url, "a")
    with psycopg.connect(db_url, autocommit=True) as conn:
        roles.grant(conn, "wa_user", roles.USER)
        roles.grant(conn, "wa_node", roles.WORKER)
        roles.grant(conn, "wa_boss", roles.ADMIN)
    user, node, boss = (
        {**cli_env, "CRH_DATABASE_URL": conninfo.make_conninfo(db_url, user=n)} for n in ("wa_user", "wa_node", "wa_boss")
    )
    # Everybody may look.
    assert [w["id"] for w in json.loads(run([script("crh"), "worker", "list", "--json"], user).stdout)["workers"]] == [a]
    for env in (user, node):
        proc = run([script("crh"), "worker", "stop", "a"], env, check=2 if env is user else 1)
        assert "crh_admin" in proc.stderr and "Traceback" not in proc.stderr
        proc = run([script("crh"), "node", "set", "node07", "--nice", "5"], env, check=2)
        assert "crh_admin" in proc.stderr and "Traceback" not in proc.stderr
    assert _requested(db_url)[f"a#{a}"] is None
    run([script("crh"), "worker", "drain", "a"], boss)
    run([script("crh"), "node", "set", "node07", "--nice", "5"], boss)
    assert _requested(db_url)[f"a#{a}"] == "drain"
