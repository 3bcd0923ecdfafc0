"""The block size archives are handled in, and the caps on what one archive may unpack."""

from __future__ import annotations

from dataclasses import dataclass

CHUNK = 1 << 20
"""Block size for reading, compressing and writing: large enough that the
per-call overhead of Python is negligible next to zstd and sha256."""

MAX_HEADER = 1 << 20
"""Largest metadata (pax/GNU long-name headers) accepted before a member.
tarfile reads such headers into memory whole, so an unbounded one would be a
decompression bomb that no byte limit on members catches."""


@dataclass(frozen=True)
class Limits:
    """Caps on what one archive may unpack, checked before bytes are written.

    The defaults are hundreds of times a large real tomodir (a few MB of
    input, ~50 files, ~10 MB of results), so a decompression bomb stops
    early; ``[archive]`` in the config changes them (config.archive_limits),
    and whoever unpacks passes them on."""

    max_bytes: int = 4 * 2**30
    max_members: int = 100_000
