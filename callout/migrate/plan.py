"""Step 2 of an import: what each valid row would do to the bucket (added, unchanged,
overwritten, conflicting), from the bucket's current value and revision of its key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import orjson

from callout.migrate.rows import Item, canonical, compact
from callout.records import MAX_RECORD_BYTES

# Lookups and writes in flight at once: enough to hide the round trip, few enough not to
# swamp a JetStream leader that is also serving the callout's own lookups.
IN_FLIGHT = 64
# Planning reads the whole bucket in one pass when it holds at most this many messages per
# row imported; otherwise it looks each key up.
SCAN_RATIO = 4

# What a row does to the bucket (`Item.action`); INVALID counts the rows that were not read.
ADDED = "added"
OVERWRITTEN = "overwritten"
UNCHANGED = "unchanged"
CONFLICTING = "conflicting"
INVALID = "invalid"
FAILED = "failed"

_ABSENT = object()


class Bucket(Protocol):
    """What planning and applying need from the users bucket."""

    async def get_entry(self, key: str) -> tuple[bytes, int] | None: ...

    async def size(self) -> int:
        """Messages in the bucket: at least its number of keys, the cost of a `scan`."""
        ...

    async def scan(self, keep: Callable[[str], bool]) -> dict[str, tuple[bytes, int]]:
        """(value, revision) of every live key that `keep` accepts."""
        ...

    async def create(self, key: str, value: bytes) -> bool:
        """False when the key has a live value."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        """False when the key's last revision is not `revision`."""
        ...


async def _each(items: Iterable[Item], work: Callable[[Item], Awaitable[None]], limit: int) -> None:
    """`work` on every item, at most `limit` at once; the first exception cancels the rest."""
    shared = iter(items)

    async def worker() -> None:
        for item in shared:
            await work(item)

    tasks = [asyncio.create_task(worker()) for _ in range(limit)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def plan(
    bucket: Bucket | None,
    items: dict[str, Item],
    *,
    overwrite: bool,
    limit: int = IN_FLIGHT,
    scan_ratio: float = SCAN_RATIO,
) -> None:
    """Set each item's action from the bucket's current value (`bucket` None: it does not
    exist, everything is new). A lookup error aborts: nothing has been written yet."""
    current: dict[str, tuple[bytes, int]] | None = None
    # One pass over the bucket when that reads fewer messages than the lookups would cost
    # (a lookup costs several times a delivered message); a lookup per key otherwise, so a
    # few rows imported into a large bucket do not read all of it.
    if bucket is not None and await bucket.size() <= scan_ratio * len(items):
        current = await bucket.scan(items.__contains__)

    async def classify(item: Item) -> None:
        if current is not None:
            entry = current.get(item.key)
        else:
            entry = None if bucket is None else await bucket.get_entry(item.key)
        if entry is None:
            item.action, item.revision = ADDED, 0
            return
        value, item.revision = entry
        if value == item.value:
            item.action = UNCHANGED
            return
        stored, new = canonical(value), orjson.loads(item.value)
        # Every record field is compared; an unknown field only when the input names it (one
        # the input does not mention belongs to whoever wrote it, and is kept).
        if stored is not None and all(stored.get(k, _ABSENT) == v for k, v in new.items()):
            item.action = UNCHANGED
        elif not overwrite:
            item.action, item.reason = CONFLICTING, "a different record exists"
        else:
            item.action = OVERWRITTEN
            kept = {k: v for k, v in (stored or {}).items() if k not in new}
            merged = compact(orjson.dumps({**new, **kept})) if kept else item.value
            # Too large with the kept fields: the input's record alone is what was asked for.
            if len(merged) <= MAX_RECORD_BYTES:
                item.value = merged

    await _each(items.values(), classify, limit)
