"""Live revocation: when a user's record is revoked or deleted, close the connections we
admitted for it, so its reconnect goes through the callout again and is denied.

nats-server can close a connection on request (`$SYS.REQ.SERVER.<server id>.KICK` with the
client id, from a system-account identity), but it cannot tell which connections belong to
a client key: a callout user is known to the server by the name in the JWT we issued, not
by its nkey. So every replica keeps a ledger of the connections *it* admitted — the server
id and client id are in each request — and, when the users-bucket watch reports a
revocation, kicks exactly those. Each connection is in exactly one replica's ledger, so a
revocation causes one kick per connection however many replicas there are, without a lease.

Limits, by construction: a connection admitted by a replica that has since restarted is not
in any ledger; it ends when its user JWT expires (`--user-ttl`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client

from callout import log
from callout.decision import ADMIT, Decision

# Bounds the ledger: the oldest admissions are forgotten first (they expire first too).
MAX_CONNECTIONS = 1_000_000
# How long a revocation is remembered for requests that were deciding when it arrived: far
# longer than any decision takes (--backend-timeout, the server's timeout).
_RECENT_SECONDS = 60.0


@dataclass
class Revoker:
    system: Client  # a system-account connection: only it may send KICK
    user_ttl: float
    timeout: float = 2.0
    kicked: int = 0
    failed: int = 0
    # client key -> {(server id, client id): when our JWT for it expires}
    _ledger: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    _order: OrderedDict[tuple[str, str, int], None] = field(default_factory=OrderedDict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # client key -> when we saw its record revoked or deleted, for a few seconds: a request
    # that was already deciding then may be admitted after the kick went out (see observe).
    _recent: dict[str, float] = field(default_factory=dict)

    # -- fed by the service with every decision -----------------------------------------------
    def observe(self, decision: Decision, _latency: float) -> None:
        request = decision.request
        # Internal keys have no record to revoke; soft-mode admits have none either.
        if decision.reason != ADMIT or request is None or not request.client_id:
            return
        ttl = self.user_ttl * 1.1 if self.user_ttl > 0 else float("inf")
        conn = (request.server_id, request.client_id)
        self._ledger.setdefault(request.client_key, {})[conn] = time.time() + ttl
        self._order[(request.client_key, *conn)] = None
        while len(self._order) > MAX_CONNECTIONS:
            key, server, cid = self._order.popitem(last=False)[0]
            self._ledger.get(key, {}).pop((server, cid), None)
        # Opened before the revocation was seen, admitted after its kick: kick this one too.
        revoked_at = self._recent.get(request.client_key)
        if revoked_at is not None and request.opened_at <= revoked_at:
            self._schedule(request.client_key)

    # -- fed by the users-bucket watch --------------------------------------------------------
    def record_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        if not _ends_sessions(new):
            self._recent.pop(key, None)
            return
        now = time.time()
        self._recent[key] = now
        for stale in [k for k, at in self._recent.items() if now - at > _RECENT_SECONDS]:
            del self._recent[stale]
        if key in self._ledger:
            self._schedule(key)

    def _schedule(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self.kick(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def kick(self, key: str) -> None:
        now = time.time()
        connections = [c for c, until in self._ledger.pop(key, {}).items() if until > now]
        for conn in connections:
            self._order.pop((key, *conn), None)
        results = await asyncio.gather(*(self._kick_one(*c) for c in connections))
        closed = sum(results)
        self.kicked += closed
        log.info("revoked_sessions", client=key, closed=closed, tried=len(connections))

    async def _kick_one(self, server_id: str, cid: int) -> bool:
        try:
            reply = await self.system.request(
                f"$SYS.REQ.SERVER.{server_id}.KICK",
                orjson.dumps({"cid": cid}),
                timeout=self.timeout,
            )
            doc: Any = orjson.loads(reply.data)
        except (nats.errors.Error, orjson.JSONDecodeError) as exc:
            self.failed += 1
            log.warning("kick_failed", server=server_id, cid=cid, exception=type(exc).__name__)
            return False
        # An error here is usually "not found": the connection had already gone.
        return isinstance(doc, dict) and doc.get("error") is None

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _ends_sessions(value: bytes | None) -> bool:
    """A delete, or a record that says revoked (unless revoked with --keep-sessions)."""
    if value is None:
        return True
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False  # an unreadable record denies new connections; it revokes nothing
    if not isinstance(doc, dict):
        return False
    return doc.get("revoked") is True and doc.get("keep_sessions") is not True
