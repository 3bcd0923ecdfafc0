"""Small formatting helpers for the admin commands: durations, sizes, times, aligned tables."""

from __future__ import annotations

from collections.abc import Sequence

import click

from cr_queue.util.times import when  # noqa: F401  (fmt.when, as the commands call it)


def duration(seconds: float | None) -> str:
    """12 s, 4 min 05 s, 2 h 10 min, 3 d 4 h."""
    if seconds is None:
        return "-"
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    """Left-aligned columns; the last column is not padded (it is usually a path)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    # Widths ignore colour codes, so coloured cells line up too.
    widths = [max(len(click.unstyle(r[i])) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c + " " * (widths[i] - len(click.unstyle(c))) if i < len(r) - 1 else c for i, c in enumerate(r)]
        lines.append((indent + "  ".join(padded)).rstrip())
    return lines


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"
