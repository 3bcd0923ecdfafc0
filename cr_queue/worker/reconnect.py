"""Reconnecting to the database: the one helper every thread of the worker uses.

A database outage of any length must cost no solver work (issue 14, defect 1):
each thread waits with exponential backoff, jitter and a cap, for as long as
it takes.  The jitter keeps a fleet of workers from knocking on a restarted
server all in the same instant; the cap keeps a worker from sleeping long
after the server is back (the rescue sweep gives leases that ran out while the
server was down a grace after its start, which must be longer than the cap).

The connector also remembers when a connection attempt last found the server
*down* (refused, not started, shutting down): while the server is down nobody
can take a job away from this worker, so its solvers keep running however long
the outage lasts (the watchdog's half-lease rule only applies to silence).
"""

from __future__ import annotations

import random
import threading
import time

import psycopg

from cr_queue.db.connection import Database, DatabaseError
from cr_queue.queries import session

FIRST_S = 0.5
CAP_S = 5.0
# What libpq says when it reached the host but no server accepted the connection.
DOWN_SIGNS = (
    "connection refused",
    "no such file or directory",  # the Unix socket is gone with the server
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode",
    "terminating connection due to administrator command",
)


# Errors that mean the connection is gone: lost, or ended by the server.  A transaction
# held open past idle_in_transaction_session_timeout (a frozen network path in the
# middle of it) ends with 25P03, which psycopg files under InternalError.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)


class Backoff:
    """Delays between reconnection attempts: 0.5, 1, 2, 4, 5, 5 ... s, each shortened by up to half at random.

    ``step`` is the nominal delay (what the log shows), ``wait`` sleeps a
    jittered share of it, on an event so that a stopping worker is not held up.
    """

    def __init__(self, first: float = FIRST_S, cap: float = CAP_S) -> None:
        self.first = first
        self.cap = cap
        self.step = first

    def reset(self) -> None:
        self.step = self.first

    def wait(self, stop: threading.Event | None = None) -> None:
        delay = self.step * random.uniform(0.5, 1.0)
        self.step = min(self.step * 2, self.cap)
        if stop is None:
            time.sleep(delay)
        else:
            stop.wait(delay)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def server_down(exc: BaseException) -> bool:
    """Whether an error says the server is not running (as opposed to silence or a refusal of us)."""
    text = str(exc).lower()
    return any(sign in text for sign in DOWN_SIGNS)


class Connector:
    """Opens the worker's connections and keeps track of whether the server was last seen down."""

    def __init__(self, db: Database, name: str, idle_transaction_limit: float) -> None:
        self.db = db
        self.name = name
        self.idle_transaction_limit = idle_transaction_limit
        # time.monotonic() when the server was last found down (None: never).
        self.down_at: float | None = None

    def connect(self, role: str) -> psycopg.Connection:
        """A connection for one thread; failing to connect is just another lost connection.

        db.connect turns a refused connection into a DatabaseError for people;
        here it must be an OperationalError, which every loop rides out with
        backoff.
        """
        try:
            conn = self.db.connect(f"crh_worker {self.name} {role}", keepalive=True)
            session.bound_idle_transactions(conn, self.idle_transaction_limit)
        except (DatabaseError, psycopg.OperationalError) as exc:
            if server_down(exc):
                self.down_at = time.monotonic()
            raise psycopg.OperationalError(str(exc)) from None
        return conn

    def saw_down(self, exc: BaseException) -> None:
        """A working connection broke because the server is going down: remember it."""
        if server_down(exc):
            self.down_at = time.monotonic()
