"""Timestamps as a person reads them, for every report (the commands' tables, the web's pages)."""

from __future__ import annotations

from datetime import datetime


def when(moment: str | datetime | None) -> str:
    """A timestamp (datetime or ISO string) as local 'YYYY-MM-DD HH:MM:SS'; '-' for none."""
    if not moment:
        return "-"
    try:
        value = moment if isinstance(moment, datetime) else datetime.fromisoformat(moment)
    except ValueError:
        return str(moment)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
