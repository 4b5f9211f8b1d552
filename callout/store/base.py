"""The store interface the service depends on.

One question, because the decision path needs one thing: the record for a key, or the fact
that there is none, and, where the store can tell, that the key had one and it was deleted
(`TOMBSTONE`): soft mode admits a key that never had a record, never one that was deleted.
Everything else (a missing bucket, JetStream down, a timeout) is a `StoreError`, which the
decision turns into a deny: "no answer" must never be mistaken for "no record", or soft mode
would admit everyone while the store is down. `get_nowait` asks the same question of a store
that may know the answer without a round trip (a cache).
"""

from __future__ import annotations

from typing import Final, Protocol


class StoreError(Exception):
    """The store could not answer. The message is for operators (no secrets) and is logged."""


class Tombstone(bytes):
    """The value of a key whose last write is a delete or purge marker. A `bytes` that is
    empty, so code that does not know it sees an empty record: invalid, a deny in every mode,
    never "no record"."""


TOMBSTONE: Final = Tombstone()


class WouldBlock(Exception):
    """`get_nowait` cannot answer without a round trip: only the awaited `get` can answer now."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The record stored under `key`; `TOMBSTONE` when its last write deleted it (stores
        that can tell); None when there is certainly no record and no delete marker."""
        ...

    def get_nowait(self, key: str) -> bytes | None:
        """What `get` would answer, when it can be answered without waiting; else WouldBlock."""
        ...
