"""The store interface the service depends on.

The decision path needs one thing: the record for a key, or the fact that there is none.
Everything else (a missing bucket, JetStream down, a timeout) is a `StoreError`, which the
decision turns into a deny: "no answer" must never be mistaken for "no record", or soft mode
would admit everyone while the store is down.

Two ways to ask: `get` awaits the answer; `get_nowait` answers at once when the store can
without I/O (a copy in memory) and raises `WouldBlock` when only `get` can. The service
tries `get_nowait` first, so a lookup answered from memory costs no task and no await.
"""

from __future__ import annotations

from typing import Protocol


class StoreError(Exception):
    """The store could not answer. The message is for operators (no secrets) and is logged."""


class WouldBlock(Exception):
    """`get_nowait` cannot answer without I/O: ask `get`. Says nothing about the record."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The record stored under `key`, or None when there is certainly none."""
        ...

    def get_nowait(self, key: str) -> bytes | None:
        """What `get` would answer, when that needs no I/O; otherwise raises `WouldBlock`."""
        ...
