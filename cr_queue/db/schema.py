"""The database schema as SQLAlchemy Core tables: the single source for alembic.

Names follow cr_hydra (``inversions``, ``binary_data``, ``status``,
``datetime_finished``, ``inv_computer``, ...) so that the admin queries people
have typed for years keep working.  Everything the lifecycle needs beyond
that (attempts, leases, workers, events) is added beside those names.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from cr_queue.job_states import JobStatus

SIM_TYPES = ("mod", "inv")
# The CHECK constraint on inversions.status, built from the one list of states; its text
# is exactly what migration 0001 created (tests/test_migrations.py compares them).
STATUS_CHECK = "status IN (" + ", ".join(f"'{state}'" for state in JobStatus) + ")"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _time(name: str, *, default_now: bool = False) -> Column:
    """A point in time; ``default_now``: set by the database when the row is made, never NULL."""
    if default_now:
        return Column(name, DateTime(timezone=True), nullable=False, server_default=func.now())
    return Column(name, DateTime(timezone=True), nullable=True)


def _db_role() -> Column:
    """The database role that made the row: with a login per user, each sees its own (migration 0003)."""
    return Column("db_role", Text, nullable=False, server_default=text("current_user"))


def _host_setting(name: str) -> Column:
    """A number an admin sets for every worker on a host; NULL: the workers use their own
    option (``crh node unset``), so a host's row need not repeat what it does not change."""
    return Column(name, Integer, nullable=True)


blobs = Table(
    "blobs",
    metadata,
    Column("id", BigInteger, primary_key=True),
    # NULL while the upload streams in: the hash is known only at the end.
    Column("sha256", Text, nullable=True, unique=True),
    Column("size", BigInteger, nullable=False, server_default=text("0")),
    Column("raw_size", BigInteger, nullable=True),
    Column("n_chunks", Integer, nullable=False, server_default=text("0")),
    Column("complete", Boolean, nullable=False, server_default=text("false")),
    _time("datetime_created", default_now=True),
    _time("datetime_completed"),
    # Who uploaded it: with per-user roles a user reads only its own uploads and results.
    _db_role(),
    # Where the bytes are: 'db' (chunks in binary_data) or 'dir' (the [store] path directory).
    Column("location", Text, nullable=False, server_default=text("'db'")),
    CheckConstraint("NOT complete OR sha256 IS NOT NULL", name="complete_has_sha256"),
    CheckConstraint("location IN ('db', 'dir')", name="location"),
)

# Other roles that uploaded the same bytes as a stored blob (checked by the
# database, see crh_adopt_blob in migration 0003): they may use it too.
blob_owners = Table(
    "blob_owners",
    metadata,
    Column("blob_id", BigInteger, ForeignKey("blobs.id", ondelete="CASCADE"), nullable=False),
    Column("db_role", Text, nullable=False),
    _time("datetime_added", default_now=True),
    PrimaryKeyConstraint("blob_id", "db_role"),
)

binary_data = Table(
    "binary_data",
    metadata,
    Column("blob_id", BigInteger, ForeignKey("blobs.id", ondelete="CASCADE"), nullable=False),
    Column("chunk_no", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("blob_id", "chunk_no"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", Text, nullable=False),
    _db_role(),
    Column("state", Text, nullable=False, server_default=text("'running'")),
    Column("jobs", Integer, nullable=False),
    Column("threads", Integer, nullable=False),
    Column("groups", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("solvers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _time("datetime_started", default_now=True),
    _time("last_heartbeat", default_now=True),
    _time("datetime_stopped"),
    Column("stop_reason", Text, nullable=True),
    Column("requested", Text, nullable=True),
    CheckConstraint("state IN ('running', 'draining', 'stopped')", name="state"),
    CheckConstraint("requested IN ('drain', 'stop')", name="requested"),
)

# Per-host settings an admin keeps in the database (cr_hydra's node_settings).
node_settings = Table(
    "node_settings",
    metadata,
    Column("host", Text, primary_key=True),
    _host_setting("nice"),
    _host_setting("cpus"),
    _host_setting("threads"),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    _time("datetime_updated", default_now=True),
)

inversions = Table(
    "inversions",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("status", Text, nullable=False, server_default=text("'registering'")),
    Column("sim_type", Text, nullable=False),
    # A tomodir that needs modelling before its inversion is one job.
    Column("model_first", Boolean, nullable=False, server_default=text("false")),
    Column("username", Text, nullable=False),
    _db_role(),
    Column("source_computer", Text, nullable=False),
    Column("source_path", Text, nullable=False),
    Column("crh_file", Text, nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    # Within a priority, logins take turns: a login's n-th waiting job has rank n.
    Column("fair_rank", BigInteger, nullable=False, server_default=text("0")),
    Column("job_group", Text, nullable=True),
    Column("threads", Integer, nullable=False, server_default=text("1")),
    Column("timeout_s", Integer, nullable=True),
    # Three numbers count a job's runs:
    # * attempt: the fencing number.  Each claim starts a new attempt; every later
    #   write of the worker names it, and a write naming an attempt that is no longer
    #   current is refused.  It only ever grows.
    # * tries: the claims that count against max_attempts.  A claim adds one; a
    #   graceful give-back (release: shutdown, broken node) takes it back; a requeue
    #   starts again from 0.
    # * max_attempts: how many tries a job whose worker keeps getting lost gets before
    #   the rescue sweep fails it (crh_add --max-attempts).
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("tries", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("worker_id", BigInteger, ForeignKey("workers.id", ondelete="SET NULL"), nullable=True),
    Column("inv_computer", Text, nullable=True),
    _time("lease_expires"),
    Column("input_sha256", Text, ForeignKey("blobs.sha256"), nullable=True),
    Column("result_sha256", Text, ForeignKey("blobs.sha256"), nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("failure_category", Text, nullable=True),
    Column("failure_reason", Text, nullable=True),
    _time("datetime_init", default_now=True),
    _time("datetime_queued"),
    _time("datetime_started"),
    _time("datetime_finished"),
    Column("downloaded", Boolean, nullable=False, server_default=text("false")),
    _time("datetime_downloaded"),
    # When crh_cleanup purged the archives of this retrieved job (migration 0006);
    # the row and its events stay, the hashes let go are in its 'purged' event.
    _time("datetime_purged"),
    # The sipdir a frequency's tomodir belongs to: one line in status, one retrieve.
    Column("sipdir", Text, nullable=True),
    CheckConstraint(STATUS_CHECK, name="status"),
    CheckConstraint("sim_type IN ('mod', 'inv')", name="sim_type"),
    CheckConstraint("threads >= 1", name="threads"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
    # What must always hold, whoever writes the row (migration 0005): a finished job has its
    # result; priority within crh_add's range; ranks and counters never negative nor near overflow.
    # A finished job has a result, unless it was purged after retrieval (migration 0006).
    CheckConstraint("status <> 'finished' OR result_sha256 IS NOT NULL OR datetime_purged IS NOT NULL",
                    name="finished_has_result"),
    CheckConstraint("priority BETWEEN -1000000 AND 1000000", name="priority"),
    CheckConstraint("fair_rank BETWEEN 0 AND 1000000000000000", name="fair_rank"),
    CheckConstraint("attempt >= 0 AND tries >= 0 AND tries <= attempt", name="counters"),
    CheckConstraint("max_attempts BETWEEN 1 AND 1000", name="max_attempts_range"),
    # The claim query reads exactly this index: queued jobs, best first.
    Index(
        "ix_inversions_claim",
        text("priority DESC"),
        "fair_rank",
        "id",
        postgresql_where=text("status = 'queued'"),
    ),
    # Fair share is by login (db_role), never by the username a client writes (migration 0005).
    Index("ix_inversions_login_rank", "db_role", "fair_rank", postgresql_where=text("status = 'queued'")),
    # The front of the round robin, read at every registration (migration 0004).
    Index("ix_inversions_queued_rank", "fair_rank", postgresql_where=text("status = 'queued'")),
    Index("ix_inversions_running", "worker_id", postgresql_where=text("status = 'running'")),
    Index("ix_inversions_source", "source_computer", "source_path"),
    Index("ix_inversions_finished", "inv_computer", "datetime_finished"),
    Index("ix_inversions_status", "status"),
    Index("ix_inversions_sipdir", "sipdir", postgresql_where=text("sipdir IS NOT NULL")),
    # Row-level security looks jobs up by owner and by archive (migration 0003).
    Index("ix_inversions_db_role", "db_role"),
    Index("ix_inversions_input_sha256", "input_sha256"),
    Index("ix_inversions_result_sha256", "result_sha256"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("job_id", BigInteger, ForeignKey("inversions.id", ondelete="CASCADE"), nullable=False),
    Column("datetime", DateTime(timezone=True), nullable=False, server_default=text("clock_timestamp()")),
    Column("event", Text, nullable=False),
    Column("status", Text, nullable=True),
    Column("attempt", Integer, nullable=True),
    _db_role(),
    Column("os_user", Text, nullable=True),
    Column("host", Text, nullable=True),
    Column("pid", Integer, nullable=True),
    Column("worker_id", BigInteger, nullable=True),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Index("ix_events_job_id", "job_id"),
)
