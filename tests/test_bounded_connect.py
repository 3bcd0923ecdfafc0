"""A server that accepts the connection and never answers: every command gives up within its connect timeout.

The listener is a real TCP socket in this process that accepts and then
says nothing, as a hung server or a half-open path does.  Without the
timeout on every connection, the schema check's second attempt (alembic's)
waited psycopg's default of 130 s.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cr_queue.config import ConfigError, load
from cr_queue.db.connection import Database, DatabaseError

from .conftest import commands_env, run, script


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port on 127.0.0.1 whose listener accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    for conn in held:
        conn.close()
    thread.join(timeout=5)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = commands_env("postgresql://nobody@127.0.0.1:1/unused", tmp_path)
    env.pop("CRH_DATABASE_URL")
    env.pop("CRH_CONNECT_TIMEOUT", None)
    env.update(extra)
    return env


def test_status_at_a_silent_server_exits_2_within_the_default_timeout(silent_server: int, tmp_path: Path) -> None:
    url = f"postgresql://crh@127.0.0.1:{silent_server}/x"
    # 60 s is only the harness's guard against a hang; the command gives up after 10 s (twice that without the fix's
    # single attempt, 140 s before it).
    proc = run([script("crh_status"), "--db", url], _env(tmp_path), timeout=60, check=2)
    assert f"127.0.0.1:{silent_server}" in proc.stderr
    assert "did not answer within 10 s" in proc.stderr
    assert "CRH_CONNECT_TIMEOUT" in proc.stderr and "[database] connect_timeout" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["crh_status"],
        ["crh_cleanup", "--dry-run"],
        ["crh_retrieve"],
        ["crh_cancel", "1"],
        ["crh", "show", "1"],
    ],
)
def test_every_command_honours_the_configured_timeout(silent_server: int, tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "postgresql://crh@127.0.0.1:{silent_server}/x"\nconnect_timeout = 2\n')
    env = _env(tmp_path, CRH_CONFIG=str(config))
    proc = run([script(command[0]), *command[1:]], env, cwd=tmp_path, timeout=60, check=2)
    assert "did not answer within 2 s" in proc.stderr, proc.stderr


def test_the_environment_overrides_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "postgresql:///x"\nconnect_timeout = 30\n')
    monkeypatch.setenv("CRH_CONFIG", str(config))
    monkeypatch.setenv("CRH_SYSTEM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("CRH_CONNECT_TIMEOUT", raising=False)
    assert load().connect_timeout == 30
    monkeypatch.setenv("CRH_CONNECT_TIMEOUT", "4")
    assert load().connect_timeout == 4
    monkeypatch.setenv("CRH_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="CRH_CONNECT_TIMEOUT='soon'.*seconds"):
        load()


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", '"ten"', "true"])
def test_a_bad_configured_timeout_is_refused_with_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[database]\nconnect_timeout = {bad}\n")
    monkeypatch.setenv("CRH_CONFIG", str(config))
    monkeypatch.setenv("CRH_SYSTEM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("CRH_CONNECT_TIMEOUT", raising=False)
    with pytest.raises(ConfigError, match=r"\[database\] connect_timeout .* write e.g. connect_timeout = 10"):
        load()


def test_the_default_is_ten_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRH_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text("")
    monkeypatch.setenv("CRH_SYSTEM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("CRH_CONNECT_TIMEOUT", raising=False)
    assert load().connect_timeout == 10


def test_an_attempt_that_timed_out_is_closed_at_once_not_by_the_garbage_collector() -> None:
    """While the error is still held (a worker holds it through its whole retry loop) the
    attempt's socket is closed: the server sees the client go.  psycopg 3.3 left it open
    until the cyclic garbage collector ran; through an overloaded server the fleet's
    abandoned attempts became idle backends that filled max_connections (issue 16)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    port = listener.getsockname()[1]
    received: list[bytes] = []
    closed = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            while chunk := conn.recv(4096):  # libpq's SSLRequest, then nothing: never answered
                received.append(chunk)
            closed.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        db = Database(url=f"postgresql://nobody@127.0.0.1:{port}/unused", source="this test", embedded=False, connect_timeout=1)
        with pytest.raises(DatabaseError, match="timeout") as raised:
            db.connect("test")
        assert received, "the client never reached the listener"
        assert closed.wait(10), "the timed-out attempt's socket is still open while its error is held"
        assert raised.value is not None
    finally:
        listener.close()
        thread.join(timeout=35)
