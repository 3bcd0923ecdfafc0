"""The zero-setup database: a private PostgreSQL cluster started on demand.

A one-machine user has no database server, so cr_queue keeps its own cluster
under the user's data directory, reachable only through a Unix socket in a
0700 directory (no TCP, so trust authentication is safe), and starts it when a
command needs it.  The test suite starts its throwaway clusters with the same
class, which is why start-up must be fast and must survive a killed server.

================  ============================================================
``cluster``       the cluster's life: initdb, start, stop, status, one starter at a time
``binaries``      finding the server binaries (system, CRH_PG_BINDIR, pgserver wheel)
``server_user``   root's way to a cluster: the OS user its server runs as (useradd),
                  the traverse bits on the parents of its paths (chmod)
``errors``        :class:`EmbeddedError`
================  ============================================================
"""

from __future__ import annotations

from cr_queue.db.embedded.binaries import find_bindir, server_version
from cr_queue.db.embedded.cluster import PORT, Cluster, default_cluster
from cr_queue.db.embedded.errors import EmbeddedError

__all__ = ["PORT", "Cluster", "EmbeddedError", "default_cluster", "find_bindir", "server_version"]
