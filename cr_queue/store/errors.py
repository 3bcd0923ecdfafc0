"""What can go wrong with an archive store, as the callers catch it."""

from __future__ import annotations


class BlobMissing(Exception):
    """An archive a job refers to is not (or no longer) stored."""


class StoreUnavailable(OSError):
    """This host cannot use the shared-directory store; the message says which, where and what to do."""
