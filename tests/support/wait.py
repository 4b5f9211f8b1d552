"""The one wait for a condition that has no event of its own to await: a count in another
process's log, a server's state seen only by asking it (an HTTP endpoint, a stream), a cache
that goes live on its own thread. Anything that does have an event (a log line of a
`Subprocess`, an auth-error event, a message) is awaited on that event instead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
) -> float:
    """Poll `predicate` (plain or async) every `interval` seconds until it holds; fail the test
    with an AssertionError after `timeout`. Returns the seconds it took."""
    start = time.monotonic()
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"condition not met within {timeout}s"
        await asyncio.sleep(interval)
