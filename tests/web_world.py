"""One world for the tests of `crh web` (tests/test_web_*.py): a database with two
scientists' jobs and a compute node, and `crh web` started as a real process.

* ``web_alice`` (crh_user) adds a good inversion, a CRMod job, an inversion
  the stand-in fails with exe/error.dat, and a sipdir of three frequencies;
* ``web_bob`` (crh_user) adds one inversion;
* ``web_node`` (crh_worker) runs them all with ``crh_worker -q`` and the
  stand-in solvers, when a test asks (:meth:`World.run_worker`): the browser
  test that watches a job finish starts it while the page is open.

The logins are made with the real `crh db grant-user/grant-worker` commands
(as the test cluster's superuser, who owns the tables and so sees
everything, like an admin).  Built once per test module: the database is a
clone of the migrated template, dropped at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from cr_queue.tomodir import synth

from .conftest import TEMPLATE, commands_env, run, script

ALICE, BOB, NODE = "web_alice", "web_bob", "web_node"


def web_env(db_url: str, home: Path) -> dict[str, str]:
    """conftest's environment for the commands, with matplotlib's font cache kept in ``home``."""
    return {**commands_env(db_url, home), "MPLCONFIGDIR": str(home / "matplotlib")}


def url_as(db_url: str, login: str) -> str:
    return conninfo.make_conninfo(db_url, user=login)


class Web:
    """`crh web --port 0` as a real process; its URL from its first line."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [script("crh"), "web", "--port", "0", *args], env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True
        )
        line = self.proc.stdout.readline()
        match = re.match(r"crh web: (http://\S+)", line)
        if not match:
            self.stop()
            raise AssertionError(f"crh web did not start: {line!r}\n{log.read_text()}")
        self.url = match.group(1)
        self.banner = line + "".join(self.proc.stdout.readline() for _ in range(2))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class World:
    db_url: str  # the superuser's: owns the tables, sees every job
    home: Path
    env: dict[str, str]
    alice: dict[str, int] = field(default_factory=dict)  # what -> job id
    bob: dict[str, int] = field(default_factory=dict)
    sipdir: str = ""
    host: str = ""
    worker_ran: bool = False
    webs: list[Web] = field(default_factory=list)

    def env_as(self, login: str) -> dict[str, str]:
        return {**self.env, "CRH_DATABASE_URL": url_as(self.db_url, login)}

    def add(self, login: str, tree: Path) -> list[dict]:
        return json.loads(run([script("crh_add"), "--json"], self.env_as(login), cwd=tree).stdout)["added"]

    def run_worker(self) -> None:
        """The compute node runs every queued job and stops (once per world)."""
        if not self.worker_ran:
            report = json.loads(run([script("crh_worker"), "-q", "--json"], self.env_as(NODE), timeout=600).stdout)
            assert report["finished"] == len(self.alice) + len(self.bob) - 1 and report["failed"] == 1, report
            self.worker_ran = True

    def web(self, login: str | None, *args: str) -> Web:
        """`crh web` with ``login`` (None: the superuser, who sees everything)."""
        env = self.env if login is None else self.env_as(login)
        web = Web(env, self.home / f"web-{login or 'owner'}-{len(self.webs)}.log", *args)
        self.webs.append(web)
        return web

    def stop(self) -> None:
        for web in self.webs:
            web.stop()


def _by_path(added: list[dict]) -> dict[str, int]:
    return {Path(item["path"]).name: item["job_id"] for item in added}


@pytest.fixture(scope="module")
def world(pg_cluster, template_url, tmp_path_factory) -> World:
    name = f"w_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
    db_url = conninfo.make_conninfo(pg_cluster.url, dbname=name)
    home = tmp_path_factory.mktemp("web-world")
    env = web_env(db_url, home)
    world = World(db_url=db_url, home=home, env=env)
    try:
        run([script("crh"), "db", "grant-user", ALICE], env)
        run([script("crh"), "db", "grant-user", BOB], env)
        run([script("crh"), "db", "grant-worker", NODE], env)

        alice_tree = home / "alice"
        synth.make_tomodir(alice_tree / "survey" / "good", "inv", nx=16, nz=6, seed=1)
        synth.make_tomodir(alice_tree / "survey" / "model", "mod", nx=12, nz=4, seed=2)
        bad = synth.make_tomodir(alice_tree / "survey" / "bad", "inv", seed=3)
        (bad / "exe" / "standin.cfg").write_text("fail = error_dat\n")
        sipdir = synth.make_sipdir(alice_tree / "sip", [0.1, 1.0, 10.0], nx=10, nz=4, seed=4)
        added = world.add(ALICE, alice_tree)
        world.alice = _by_path(added)
        assert set(world.alice) == {"good", "model", "bad", "00_0.100000", "01_1.000000", "02_10.000000"}, world.alice
        world.sipdir = str(sipdir)
        bob_tree = home / "bob"
        synth.make_tomodir(bob_tree / "secret", "inv", seed=9)
        world.bob = _by_path(world.add(BOB, bob_tree))
        with psycopg.connect(db_url) as conn:
            world.host = conn.execute("SELECT source_computer FROM inversions WHERE id = %s", (world.alice["good"],)).fetchone()[0]
        yield world
    finally:
        world.stop()
        with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
