"""The store interface the service depends on.

One method, because the decision path needs one thing: the record for a key, or the fact
that there is none. Everything else (a missing bucket, JetStream down, a timeout) is a
`StoreError`, which the decision turns into a deny: "no answer" must never be mistaken
for "no record", or soft mode would admit everyone while the store is down.
"""

from __future__ import annotations

from typing import Protocol


class StoreError(Exception):
    """The store could not answer. The message is for operators (no secrets) and is logged."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The record stored under `key`, or None when there is certainly none."""
        ...
