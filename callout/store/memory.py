"""An in-memory store for unit tests: same interface, with switches to make it fail."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from callout.store.base import TOMBSTONE, StoreError, WouldBlock


@dataclass
class MemoryStore:
    records: dict[str, bytes] = field(default_factory=dict)
    # Keys whose last write was a delete (answered TOMBSTONE while they have no record).
    deleted: set[str] = field(default_factory=set)
    # Fault switches: raise StoreError, or wait this long before answering.
    error: str | None = None
    delay: float = 0.0
    lookups: int = 0

    async def get(self, key: str) -> bytes | None:
        self.lookups += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise StoreError(self.error)
        return self._value(key)

    def get_nowait(self, key: str) -> bytes | None:
        if self.delay or self.error is not None:
            raise WouldBlock  # the awaited get waits, or fails
        self.lookups += 1
        return self._value(key)

    def _value(self, key: str) -> bytes | None:
        value = self.records.get(key)
        if value is None and key in self.deleted:
            return TOMBSTONE
        return value
