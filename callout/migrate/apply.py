"""Step 3 of an import: the writes `plan` decided, each conditional on the key being as
planned."""

from __future__ import annotations

from collections.abc import Collection

from callout.migrate.plan import ADDED, CONFLICTING, FAILED, IN_FLIGHT, OVERWRITTEN, Bucket, _each
from callout.migrate.rows import Item
from callout.store.kv import NoStreamError


async def apply(bucket: Bucket, items: Collection[Item], *, limit: int = IN_FLIGHT) -> None:
    """Write what `plan` decided. Each write is conditional on the key being as planned; one
    that is not becomes a conflict. A write error fails that item only: the rest go on, and
    running the import again finishes the job (what was written is then unchanged). Once a
    write has found no stream for the whole time a write waits, JetStream is down, not one
    key: the rest are not tried (each would wait as long), and fail with that reason."""
    down: str | None = None

    async def write(item: Item) -> None:
        nonlocal down
        if item.action not in (ADDED, OVERWRITTEN):
            return
        if down is not None:
            item.action, item.reason = FAILED, f"not tried: {down}"
            return
        try:
            if item.action == ADDED:
                ok = await bucket.create(item.key, item.value)
            else:
                ok = await bucket.update(item.key, item.value, item.revision)
        except Exception as exc:  # any error: this write's outcome is unknown, the others are not
            item.action, item.reason = FAILED, _describe(exc)
            if isinstance(exc, NoStreamError):
                down = item.reason
            return
        if not ok:
            item.action, item.reason = CONFLICTING, "changed while importing; left as it is"

    await _each(items, write, limit)


def _describe(exc: BaseException) -> str:
    return str(exc).strip()[:200] or type(exc).__name__
