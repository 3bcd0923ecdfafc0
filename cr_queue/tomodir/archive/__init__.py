"""Streaming tar + zstd + sha256 archives: packing, safe unpacking, file manifests.

Archives reach a gigabyte, so every module here works in fixed-size blocks
(:data:`CHUNK`): nothing ever holds a whole archive, or a whole member, in
memory.  The sha256 covers the *compressed* bytes, because that is what the
store keeps and what every hop verifies before unpacking.

=============  ==============================================================
``packing``    the tar writer: a tree through zstd into a sink (:func:`pack`)
``headers``    tar member headers, byte for byte as tarfile writes them
``hashing``    sha256 while streaming, verified copies of downloads
``stream``     the forward reader: zstd decompressed one block ahead for tarfile
``extracting`` the extractor: every archive unpacked as hostile (:func:`unpack`)
``members``    which member paths are allowed
``manifest``   (size, mtime_ns) snapshots: which files a solver wrote
``sizes``      the block size and the caps on unpacking (:class:`Limits`)
``errors``     what goes wrong, as the commands report it
=============  ==============================================================

Callers use the names below (``from cr_queue.tomodir import archive``).
"""

from __future__ import annotations

from cr_queue.tomodir.archive.errors import ArchiveError, ChecksumMismatch, UnsafeArchive
from cr_queue.tomodir.archive.extracting import Place, unpack
from cr_queue.tomodir.archive.hashing import HashingReader, Writable, copy_verified, sha256_file
from cr_queue.tomodir.archive.manifest import changed_since, snapshot
from cr_queue.tomodir.archive.packing import PackResult, pack
from cr_queue.tomodir.archive.sizes import CHUNK, Limits

__all__ = [
    "CHUNK",
    "ArchiveError",
    "ChecksumMismatch",
    "HashingReader",
    "Limits",
    "PackResult",
    "Place",
    "UnsafeArchive",
    "Writable",
    "changed_since",
    "copy_verified",
    "pack",
    "sha256_file",
    "snapshot",
    "unpack",
]
