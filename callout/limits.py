"""Bounded in-memory records the decision rules consult: what was answered already, and who
keeps failing. No I/O, so they live inside the sans-I/O core and replay exactly."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class SeenRequests:
    """Bounded memory of answered (server id, value) pairs, each kept until its request
    expires. Used with user_nkey (fresh per request) and with the client nonce, never with
    jti, which repeats within a second (docs/protocol.md §4, "The request jti is not unique").
    When full, the oldest entries go first; a replayed request's response is addressed to a
    user key whose private half the server discarded, so forgetting early is not an admit."""

    capacity: int = 100_000
    _entries: OrderedDict[tuple[str, str], float] = field(default_factory=OrderedDict)

    def first_sight(self, server_id: str, value: str, until: float, now: float) -> bool:
        entries = self._entries
        key = (server_id, value)
        # Entries are inserted in time order (give or take a second), so expired ones are at
        # the front; a seen key is only "seen" while it has not expired.
        while entries:
            oldest_key, oldest_until = next(iter(entries.items()))
            if oldest_until >= now:
                break
            del entries[oldest_key]
        if key in entries:
            return False
        while len(entries) >= self.capacity:
            entries.popitem(last=False)
        entries[key] = until
        return True

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class FailureLimiter:
    """A token bucket per identity (a client key, or a source host): each failure takes a
    token, tokens come back at `limit / window` per second, and an identity with no token
    left is throttled. So a loop that fails faster than `limit` per `window` is throttled
    for as long as it keeps going, and recovers on its own when it slows down. `limit` 0
    turns it off. Bounded: the least recently failing identities are forgotten first."""

    limit: int = 10
    window: float = 10.0
    capacity: int = 100_000
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def _tokens(self, identity: str, now: float) -> float:
        entry = self._buckets.get(identity)
        if entry is None:
            return float(self.limit)
        tokens, updated = entry
        # A wall clock stepping back must not extend a penalty: no time passing earns nothing.
        elapsed = max(0.0, now - updated)
        return min(float(self.limit), tokens + elapsed * self.limit / self.window)

    def throttled(self, identity: str, now: float) -> bool:
        return self.limit > 0 and identity in self._buckets and self._tokens(identity, now) < 1.0

    def failed(self, identity: str, now: float) -> None:
        if self.limit <= 0 or not identity:
            return
        tokens = max(0.0, self._tokens(identity, now) - 1.0)
        self._buckets[identity] = (tokens, now)
        self._buckets.move_to_end(identity)
        while len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
