"""Thin typed wrappers around cr_queue/queries/web.sql: what `crh web`'s pages read.

Each function runs one named statement and returns plain rows; the web
service (cr_queue/web/) decides what to show.  Nothing here writes.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from cr_queue.queries import loader

SQL = loader.load("web")


def _rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def session_facts(conn: psycopg.Connection) -> dict[str, Any]:
    return _rows(conn, SQL.session_facts)[0]


def by_state_and_group(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(conn, SQL.by_state_and_group)


def hourly(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(conn, SQL.hourly)


def running_per_node(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(conn, SQL.running_per_node)


def running_by_worker(conn: psycopg.Connection) -> dict[int, list[int]]:
    return {row["worker_id"]: row["jobs"] for row in _rows(conn, SQL.running_by_worker)}


def latest_jobs(conn: psycopg.Connection, limit: int) -> list[dict[str, Any]]:
    return _rows(conn, SQL.latest_jobs, {"limit": limit})


# The job list's filters, each None when off: status, username, group, sipdir, path.
FILTERS = ("status", "username", "group", "sipdir", "path")


def jobs_page(
    conn: psycopg.Connection, filters: dict[str, str | None], *, before: int | None = None, limit: int = 50
) -> tuple[list[dict[str, Any]], int]:
    """One page of the filtered job list and how many jobs the filters match in all.

    One statement, so that the filters are written once (web.sql) and the page and its
    count read the same snapshot; its row for an empty page (id NULL) only carries the count.
    """
    rows = _rows(conn, SQL.jobs_page, {**{k: filters.get(k) for k in FILTERS}, "before": before, "limit": limit})
    total = rows[0]["total"]
    page = [{k: v for k, v in row.items() if k != "total"} for row in rows if row["id"] is not None]
    return page, total


def job_archives(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    rows = _rows(conn, SQL.job_archives, {"id": job_id})
    return rows[0] if rows else None


def sipdir_jobs(conn: psycopg.Connection, sipdir: str, host: str) -> list[dict[str, Any]]:
    return _rows(conn, SQL.sipdir_jobs, {"sipdir": sipdir, "host": host})
