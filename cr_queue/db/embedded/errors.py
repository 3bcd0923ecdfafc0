"""What goes wrong with the embedded cluster, as the commands report it."""

from __future__ import annotations


class EmbeddedError(Exception):
    """The embedded cluster could not be found, set up, started or stopped."""
