"""The job list's one statement (web.sql jobs_page): the page and the count of the same filters."""

from __future__ import annotations

from cr_queue.queries import web as wq

NO_FILTERS = {k: None for k in wq.FILTERS}


def _add(conn, n: int, status: str) -> list[int]:
    return [
        conn.execute(
            "INSERT INTO inversions (status, sim_type, username, source_computer, source_path, crh_file) "
            "VALUES (%s, 'mod', 'alice', 'pc', %s, 'crh.cfg') RETURNING id",
            (status, f"/data/p{i}/td"),
        ).fetchone()[0]
        for i in range(n)
    ]


def test_a_page_counts_every_job_its_filters_match_not_only_the_page(conn):
    queued = _add(conn, 5, "queued")
    _add(conn, 2, "cancelled")
    page, total = wq.jobs_page(conn, {**NO_FILTERS, "status": "queued"}, limit=2)
    assert [row["id"] for row in page] == sorted(queued, reverse=True)[:2]
    assert total == 5 and "total" not in page[0]
    after, total = wq.jobs_page(conn, {**NO_FILTERS, "status": "queued"}, before=page[-1]["id"], limit=2)
    assert [row["id"] for row in after] == sorted(queued, reverse=True)[2:4] and total == 5


def test_an_empty_page_still_says_how_many_jobs_there_are(conn):
    jobs = _add(conn, 3, "queued")
    assert wq.jobs_page(conn, NO_FILTERS, before=min(jobs)) == ([], 3)
    assert wq.jobs_page(conn, {**NO_FILTERS, "username": "nobody"}) == ([], 0)
