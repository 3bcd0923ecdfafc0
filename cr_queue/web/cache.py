"""A bounded cache for what the web makes from archives: pictures and parsed files.

Keys name content by sha256 (an archive never changes under its hash), so
an entry never goes stale: the cache is bounded by size only, least recently
used out first.  :meth:`Cache.get_or_make` makes a missing entry once even
when several requests ask for it at the same time (the others wait for it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Cache(Generic[T]):
    def __init__(self, max_bytes: int, size: Callable[[T], int] = len) -> None:  # type: ignore[assignment]
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}
        self.made = 0

    def get(self, key: str) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: T) -> None:
        size = self._size(value)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old

    def get_or_make(self, key: str, make: Callable[[], T | None]) -> T | None:
        """The value of ``key``, made by ``make`` if missing (a None from ``make`` is not kept)."""
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        try:
            with making:
                value = self.get(key)
                if value is None:
                    value = make()
                    if value is not None:
                        self.made += 1
                        self.put(key, value)
        finally:
            with self._lock:
                self._making.pop(key, None)
        return value
