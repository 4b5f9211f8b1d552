"""The store interface the service depends on.

One question, because the decision path needs one thing: the record for a key, or the fact
that there is none. Everything else (a missing bucket, JetStream down, a timeout) is a
`StoreError`, which the decision turns into a deny: "no answer" must never be mistaken
for "no record", or soft mode would admit everyone while the store is down. `get_nowait` asks
the same question of a store that may know the answer without a round trip (a cache).
"""

from __future__ import annotations

from typing import Protocol


class StoreError(Exception):
    """The store could not answer. The message is for operators (no secrets) and is logged."""


class WouldBlock(Exception):
    """`get_nowait` cannot answer without a round trip: only the awaited `get` can answer now."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The record stored under `key`, or None when there is certainly none."""
        ...

    def get_nowait(self, key: str) -> bytes | None:
        """What `get` would answer, when it can be answered without waiting; else WouldBlock."""
        ...
