"""Archive stores: where packed tomodirs live, content addressed by their sha256.

Two stores, chosen per installation (choice.py): the **database** (default:
chunks in ``binary_data``, one service to run and back up) or a **shared
directory** (``[store] path``: files ``<path>/<sha[:2]>/<sha>.tar.zst``,
directory.py).  Either way every archive has a ``blobs`` row, so jobs keep
their foreign keys and every admin query sees sizes.  There is no default
store: the :class:`~cr_queue.db.connection.Database` a command opens
(``cr_queue.database.open_database``, which asks :func:`configured`) carries
the installation's, and whoever uploads or fetches is handed it::

    db = open_database(settings)
    packed = store.put_tree(conn, db.store, root)
    store.fetch(conn, db.store, packed.sha256, fileobj)

upload.py is the one upload protocol for both locations, read.py reads
archives back (verified before anyone unpacks), garbage.py collects what no
job needs.  Their statements are in cr_queue/queries/blobs.sql.
"""

from cr_queue.queries.blobs import BlobRow, Garbage
from cr_queue.store.choice import DATABASE, DatabaseStore, Store, configured, from_settings
from cr_queue.store.directory import DirectoryStore
from cr_queue.store.errors import BlobMissing, StoreUnavailable
from cr_queue.store.garbage import GarbageReport, collect_garbage
from cr_queue.store.read import chunks, fetch, look_up
from cr_queue.store.upload import CHUNK_SIZE, Packed, Produce, Upload, put_many, put_stream, put_tree

__all__ = [
    "CHUNK_SIZE",
    "DATABASE",
    "BlobMissing",
    "BlobRow",
    "DatabaseStore",
    "DirectoryStore",
    "Garbage",
    "GarbageReport",
    "Packed",
    "Produce",
    "Store",
    "StoreUnavailable",
    "Upload",
    "chunks",
    "collect_garbage",
    "configured",
    "fetch",
    "from_settings",
    "look_up",
    "put_many",
    "put_stream",
    "put_tree",
]
