"""An in-memory store for unit tests: same interface, with switches to make it fail."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from callout.store.base import StoreError, WouldBlock


@dataclass
class MemoryStore:
    records: dict[str, bytes] = field(default_factory=dict)
    # Fault switches: raise StoreError, or wait this long before answering (and then
    # `get_nowait` cannot answer: only the awaited `get` can).
    error: str | None = None
    delay: float = 0.0
    lookups: int = 0

    async def get(self, key: str) -> bytes | None:
        self.lookups += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._answer(key)

    def get_nowait(self, key: str) -> bytes | None:
        if self.delay:
            raise WouldBlock
        self.lookups += 1
        return self._answer(key)

    def _answer(self, key: str) -> bytes | None:
        if self.error is not None:
            raise StoreError(self.error)
        return self.records.get(key)
