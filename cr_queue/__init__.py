"""cr_queue: a PostgreSQL-backed job queue for CRMod and CRTomo."""

__version__ = "0.1.0"
