"""Helpers for the fault tests: real processes, real faults, one invariant check.

A ``Lab`` is one test's world: a tree of stand-in tomodirs, the environment of
the real console scripts, a private --workdir for the workers, and every
process the test started (so a failing test never leaves a worker behind).
``check_invariants`` is what every fault test ends with.  The fixtures
``lab`` and ``proxy`` (conftest.py) give each test its own.

Nothing here asserts on wall time: waits are generous loops that fail with a
description of what never happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row
import pytest

from cr_queue.tomodir import synth

from .conftest import run, script


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` (mount's size=, e.g. "8m") at ``where``, made here, for a test's
    own full disk; unmounted at the end.  Mounting needs root: elsewhere the test is skipped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)

POLL = "0.5"
WAIT_S = 60.0
CLEANUP_WAIT_S = 10.0


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT_S, interval: float = 0.1):
    """Poll until ``predicate`` returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """True for a running process (a zombie is dead: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def standin_alive(pid: int) -> bool:
    """Alive and still a stand-in solver (not a recycled pid)."""
    if not alive(pid):
        return False
    try:
        return b"standin" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def solver_script(path: Path, body: str) -> Path:
    """A solver 'binary': a shell script (``body``, e.g. around the stand-in) in the test's own directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


@dataclass
class Run:
    """One solver start recorded by the stand-in in runs.log."""

    pid: int
    solver: str
    cwd: str

    @property
    def job_id(self) -> int:
        name = Path(self.cwd).parent.parent.name  # crh-w<pid>-job<id>-xxxx/tomodir/exe
        return int(name.split("-job", 1)[1].split("-", 1)[0])

    @property
    def worker_pid(self) -> int:
        name = Path(self.cwd).parent.parent.name
        return int(name[len("crh-w") :].split("-", 1)[0])


class WorkerProc:
    """A real crh_worker process with its JSON report on stdout and its live log on stderr."""

    def __init__(self, lab: Lab, name: str, args: Iterable[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.out_path = lab.logs / f"{name}.out"
        self.err_path = lab.logs / f"{name}.err"
        cmd = [
            script("crh_worker"),
            "--name", name,
            "--workdir", str(lab.workdir),
            "--poll", POLL,
            "--json",
            "--log-level", "info",
            *args,
        ]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=dict(env), stdout=out, stderr=err)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = WAIT_S) -> None:
        wait_for(lambda: text in self.log() or self.proc.poll() is not None, f"{self.name} to log {text!r}", timeout)
        assert text in self.log(), f"{self.name} exited ({self.proc.returncode}) without logging {text!r}:\n{self.log()}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def finish(self, timeout: float = 120) -> tuple[int, dict]:
        """Wait for the exit; returns the exit code and the JSON report (empty if none)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout} s:\n{self.log()}") from None
        text = self.out_path.read_text()
        report = json.loads(text) if text.strip() else {}
        return code, report

    def stop(self, timeout: float = 120) -> tuple[int, dict]:
        """SIGTERM, then wait for the exit."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.finish(timeout)


@dataclass
class Lab:
    tmp_path: Path
    env: dict[str, str]
    db_url: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tree = self.tmp_path / "tree"
        self.workdir = self.tmp_path / "workdir"
        self.marks = self.tmp_path / "marks"
        self.logs = self.tmp_path / "logs"
        for d in (self.tree, self.workdir, self.marks, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.env["CRH_STANDIN_MARK"] = str(self.marks)

    # ------------------------------------------------------------- inputs

    def tomodirs(self, n: int, *, kind: str = "mod", cfg: str = "sleep = 3", prefix: str = "td") -> list[Path]:
        """n stand-in tomodirs whose solver behaves as ``cfg`` (exe/standin.cfg) says."""
        made = []
        start = len(list(self.tree.iterdir()))
        for i in range(start, start + n):
            td = synth.make_tomodir(self.tree / f"{prefix}_{i:03d}", kind, seed=i)
            (td / "exe" / "standin.cfg").write_text(cfg + "\n")
            made.append(td)
        return made

    def add(self, *paths: Path, env: Mapping[str, str] | None = None) -> list[int]:
        """crh_add the paths (default: the whole tree); returns the new job ids."""
        targets = [str(p) for p in paths] or [str(self.tree)]
        out = run([script("crh_add"), "--json", *targets], dict(env or self.env))
        return [item["job_id"] for item in json.loads(out.stdout)["added"]]

    # ---------------------------------------------------------- processes

    def worker(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> WorkerProc:
        w = WorkerProc(self, name, args, env or self.env)
        self.procs.append(w.proc)
        return w

    def spawn(self, args: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            args, env=dict(env or self.env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def run_until_paused(
        self, args: list[str], point: str, *, cwd: Path | None = None, until: Path | None = None
    ) -> subprocess.Popen:
        """Start a command that stops at pause point ``point``; returns it, paused there
        (until it is killed, or, with ``until``, until that file exists)."""
        env = {**self.env, "CRH_PAUSE_AT": point} | ({"CRH_PAUSE_UNTIL": str(until)} if until else {})
        proc = self.spawn(args, env=env, cwd=cwd)
        for line in proc.stderr:
            if line.strip() == f"crh-paused {point}":
                return proc
        proc.wait()
        raise AssertionError(f"{args[0]} exited ({proc.returncode}) without reaching pause point {point}:\n{proc.stdout.read()}")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    # ------------------------------------------------------------ probing

    def runs(self) -> list[Run]:
        log = self.marks / "runs.log"
        if not log.exists():
            return []
        return [Run(int(p), s, c) for p, s, c in (line.split(" ", 2) for line in log.read_text().splitlines())]

    def wait_runs(self, n: int, timeout: float = WAIT_S) -> list[Run]:
        """Wait until the stand-in has been started n times in all."""
        return wait_for(lambda: self.runs() if len(self.runs()) >= n else None, f"{n} solver start(s)", timeout)[:n]

    def sql(self, query: str, params=()) -> list[tuple]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def job(self, job_id: int) -> dict:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cur = conn.cursor(row_factory=dict_row)
            return cur.execute("SELECT * FROM inversions WHERE id = %s", (job_id,)).fetchone()

    def status(self, job_id: int) -> str:
        return self.job(job_id)["status"]

    def wait_status(self, job_id: int, status: str, timeout: float = WAIT_S) -> dict:
        wait_for(lambda: self.status(job_id) == status, f"job {job_id} to be {status}", timeout)
        return self.job(job_id)

    def events(self, job_id: int) -> list[str]:
        return [row[0] for row in self.sql("SELECT event FROM events WHERE job_id = %s ORDER BY id", (job_id,))]

    def check_each_solved_once(self, workers: list[WorkerProc], results: list[tuple[int, dict]], n: int, why: str) -> None:
        """The ``results`` (code, report) of ``workers`` that rode out a database fault:
        all exited 0, finished the n jobs between them, refused and released none, each
        job was solved once (``why`` says what that proves) and none was rescued or released."""
        assert [code for code, _ in results] == [0] * len(workers), [w.log() for w in workers]
        assert sum(report["finished"] for _, report in results) == n
        assert sum(report["refused"] + report["released"] for _, report in results) == 0
        assert len(self.runs()) == n, why
        assert self.sql("SELECT count(*) FROM events WHERE event IN ('rescued', 'released')") == [(0,)]

    def check_invariants(self, expected: Mapping[int, str | set[str]]) -> None:
        check_invariants(self.db_url, expected, workdir=self.workdir, runs=self.runs())


def check_invariants(
    db_url: str,
    expected: Mapping[int, str | set[str]],
    *,
    workdir: Path | None = None,
    runs: Iterable[Run] = (),
) -> None:
    """What must hold after any fault:

    * every job finished at most once (at most one 'finished' event per job);
    * no job lost: the jobs are exactly the expected ones, each in an expected state;
    * no stale result accepted: a finished job's 'finished' event names its final
      attempt, and a job in 'finished' has exactly that one event;
    * nothing left behind: no job directory in the workers' --workdir and no
      stand-in solver still running (both after a few seconds for cleanup).
    """
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, attempt FROM inversions")}
        finished = conn.execute(
            "SELECT job_id, count(*), min(attempt), max(attempt) FROM events WHERE event = 'finished' GROUP BY job_id"
        ).fetchall()
    twice = {job_id: n for job_id, n, _, _ in finished if n > 1}
    assert not twice, f"jobs finished more than once: {twice}"
    assert set(jobs) == set(expected), f"jobs {sorted(jobs)} in the database, expected {sorted(expected)}"
    wrong = {
        job_id: (status, expected[job_id])
        for job_id, (status, _attempt) in jobs.items()
        if status not in ({expected[job_id]} if isinstance(expected[job_id], str) else expected[job_id])
    }
    assert not wrong, f"jobs not in an expected state (actual, expected): {wrong}"
    finished_attempt = {job_id: lo for job_id, _n, lo, _hi in finished}
    for job_id, (status, attempt) in jobs.items():
        if status == "finished":
            assert finished_attempt.get(job_id) == attempt, (
                f"job {job_id} is finished at attempt {attempt} but its finished event names "
                f"{finished_attempt.get(job_id)}"
            )
        else:
            assert job_id not in finished_attempt, f"job {job_id} has a finished event but is {status}"
    if workdir is not None:
        wait_for(
            lambda: not [p for p in workdir.iterdir() if p.name.startswith("crh-w")],
            f"no job directory left in {workdir} (still: {[p.name for p in workdir.iterdir()]})",
            CLEANUP_WAIT_S,
        )
    pids = [r.pid for r in runs]
    wait_for(
        lambda: not [pid for pid in pids if standin_alive(pid)],
        f"every stand-in solver to be gone (alive: {[pid for pid in pids if standin_alive(pid)]})",
        CLEANUP_WAIT_S,
    )


# ------------------------------------------------------------------ network


class FreezableProxy:
    """A TCP proxy to PostgreSQL's Unix socket that can stop forwarding without closing anything.

    Frozen, both directions stay connected (the kernel still acknowledges
    what the worker sends) but no byte passes: a half-open connection as a
    hung switch or a wedged NAT makes it.  New connections are accepted and
    then hang too.  ``freeze_after`` freezes right after a given statement
    went through (inside its transaction, say); ``cut_after`` drops that
    connection instead, before the statement's answer comes back.
    """

    def __init__(self, unix_path: Path) -> None:
        self.unix_path = str(unix_path)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._trigger: tuple[bytes, str] | None = None
        self.triggered = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def unfreeze(self) -> None:
        self._flowing.set()

    def freeze_after(self, pattern: bytes) -> None:
        """The next time a client sends ``pattern``: pass it on, then freeze everything."""
        self._trigger = (pattern, "freeze")

    def cut_after(self, pattern: bytes, delay: float = 0.5) -> None:
        """The next time a client sends ``pattern``: pass it on, hold the answer, give the
        server ``delay`` seconds to act (commit), then close that connection at both ends:
        a write that was done but never acknowledged."""
        self._cut_delay = delay
        self._trigger = (pattern, "cut")

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.unix_path)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            hold = threading.Event()
            ended: list[bool] = []  # one entry per direction that has ended
            for src, dst, to_server in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, to_server, hold, ended), name="proxy-pump", daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, to_server: bool, hold: threading.Event, ended: list[bool]
    ) -> None:
        try:
            self._forward(src, dst, to_server, hold)
        finally:
            # Once both directions ended the connection's sockets are closed: a long fault
            # run makes thousands of connections (seed 7 ran out of select()'s 1024).
            with self._lock:
                ended.append(True)
                if len(ended) == 2:
                    for sock in (src, dst):
                        sock.close()
                        if sock in self._sockets:
                            self._sockets.remove(sock)

    def _forward(self, src: socket.socket, dst: socket.socket, to_server: bool, hold: threading.Event) -> None:
        readable = select.poll()  # not select(): no limit on the descriptor's number
        readable.register(src, select.POLLIN)
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.1) or (hold.is_set() and not to_server):
                    time.sleep(0.01)
                    continue
                ready = readable.poll(100)
                if not ready or not self._flowing.is_set() or (hold.is_set() and not to_server):
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                trigger = self._trigger
                if to_server and trigger is not None and trigger[0] in data:
                    self._trigger = None
                    if trigger[1] == "freeze":
                        dst.sendall(data)
                        self._flowing.clear()
                        self.triggered.set()
                        continue
                    hold.set()
                    dst.sendall(data)
                    time.sleep(self._cut_delay)
                    src.close()
                    dst.close()
                    self.triggered.set()
                    return
                dst.sendall(data)
        except (OSError, ValueError):
            # A reset (a server that died with bytes unread) or a peer gone: as a real
            # network does, the other end hears of it.  Returning with the client's
            # socket left open made a half-dead connection no real path makes: the
            # client waited for ever (keepalives are answered by this proxy's kernel),
            # and the CI fault run's proxied worker never stopped (seed 369524).
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def proxy_url(proxy: FreezableProxy, db_url: str) -> str:
    """The test database's URL, reached over TCP through the proxy."""
    dbname = conninfo.conninfo_to_dict(db_url)["dbname"]
    return f"host=127.0.0.1 port={proxy.port} user=crh dbname={dbname}"

