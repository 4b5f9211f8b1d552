"""Live revocation: when a user's record changes so that it would no longer admit a
connection with the access it was given (revoked, deleted, invalid, placed elsewhere, its
permissions or admin flag narrowed), close the connections we admitted for it, so their
reconnects go through the callout again and get what the record now says.

nats-server can close a connection on request (`$SYS.REQ.SERVER.<server id>.KICK` with the
client id, from a system-account identity), but it cannot tell which connections belong to
a client key: a callout user is known to the server by the name in the JWT we issued, not
by its nkey. So every replica keeps a ledger of the connections *it* admitted — the server
id and client id are in each request, and the grant (account and permissions) the JWT
carried — and checks them against every change the users-bucket watch reports and against
every whole copy it loads (changes made while the watch was not looking, and the first load,
which may follow admits made from direct lookups). Whether a grant still stands is a rule
of the decision core (`decision.still_admits`). Each connection is in exactly one replica's
ledger, so a revocation causes one kick per connection however many replicas there are,
without a lease.

Limits, by construction: a connection admitted by a replica that has since restarted is not
in any ledger; it ends when its user JWT expires (`--user-ttl`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client

from callout import log
from callout.decision import (
    ADMIT,
    WOULD_DENY,
    Decision,
    Deleted,
    Found,
    Grant,
    Missing,
    Policy,
    StoreAnswer,
    still_admits,
)

# Bounds the ledger: the oldest admissions are forgotten first (they expire first too).
MAX_CONNECTIONS = 1_000_000
# How long a change is remembered for requests that were deciding when it arrived: far
# longer than any decision takes (--backend-timeout, the server's timeout).
_RECENT_SECONDS = 60.0
# Admits that rest on a record the watch can report changes to (internal keys have none).
_LEDGER_REASONS = frozenset({ADMIT, WOULD_DENY})


@dataclass(slots=True)
class _Admitted:
    expires: float  # when our JWT for it expires (local clock)
    grant: Grant
    had_record: bool  # admitted from a record (not a soft-mode admit of a key with none)


@dataclass
class Revoker:
    system: Client  # a system-account connection: only it may send KICK
    user_ttl: float
    policy: Policy
    timeout: float = 2.0
    kicked: int = 0
    failed: int = 0
    # client key -> {(server id, client id): what we admitted it with}
    _ledger: dict[str, dict[tuple[str, int], _Admitted]] = field(default_factory=dict)
    _order: OrderedDict[tuple[str, str, int], None] = field(default_factory=OrderedDict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # client key -> (when we saw its record change, the new answer), oldest first, for a
    # minute: a request that was already deciding then may be admitted after the change was
    # reconciled (see observe).
    _recent: OrderedDict[str, tuple[float, StoreAnswer]] = field(default_factory=OrderedDict)
    # The last whole copy loaded, and when: the same race, for changes a load revealed.
    _loaded: Mapping[str, bytes] | None = None
    _loaded_at: float = 0.0

    # -- fed by the service with every decision -----------------------------------------------
    def observe(self, decision: Decision, _latency: float) -> None:
        request, grant = decision.request, decision.grant
        if decision.reason not in _LEDGER_REASONS or request is None or grant is None:
            return
        if not request.client_id:
            return
        key = request.client_key
        ttl = self.user_ttl * 1.1 if self.user_ttl > 0 else float("inf")
        conn = (request.server_id, request.client_id)
        admitted = _Admitted(time.time() + ttl, grant, decision.reason == ADMIT)
        self._ledger.setdefault(key, {})[conn] = admitted
        self._order[(key, *conn)] = None
        while len(self._order) > MAX_CONNECTIONS:
            old_key, server, cid = self._order.popitem(last=False)[0]
            self._ledger.get(old_key, {}).pop((server, cid), None)
        # Opened before a change was seen, admitted after it was reconciled: it may have read
        # the old record, so check it against the new one now.
        seen = self._seen_since(key, request.opened_at)
        if seen is not None:
            self._reconcile(key, lambda conn: _answer(seen, conn))

    def _seen_since(self, key: str, opened_at: float) -> StoreAnswer | bytes | None:
        """What the watch said of `key` after `opened_at`: a change's answer, the value a
        load found (None when the load had none), or None."""
        recent = self._recent.get(key)
        if recent is not None:
            return recent[1] if opened_at <= recent[0] else None
        loaded = self._loaded
        if loaded is None or opened_at > self._loaded_at:
            return None
        if time.time() - self._loaded_at > _RECENT_SECONDS:
            return None
        return loaded.get(key, _ABSENT)

    # -- fed by the users-bucket watch --------------------------------------------------------
    def record_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        answer: StoreAnswer = Deleted() if new is None else Found(new)
        now = time.time()
        recent = self._recent
        recent[key] = (now, answer)
        recent.move_to_end(key)
        while recent and now - next(iter(recent.values()))[0] > _RECENT_SECONDS:
            recent.popitem(last=False)
        if key in self._ledger:
            self._reconcile(key, lambda _: answer)

    def loaded(self, copy: Mapping[str, bytes]) -> None:
        """A whole copy of the bucket (the first load and every reload): each connection in
        the ledger is checked against its key's record in it."""
        self._loaded, self._loaded_at = copy, time.time()
        self._recent.clear()  # the copy is newer than every change seen before it
        for key in list(self._ledger):
            self._reconcile(key, functools.partial(_answer, copy.get(key, _ABSENT)))

    def _reconcile(self, key: str, answer_for: Callable[[_Admitted], StoreAnswer]) -> None:
        """Kick the connections of `key` whose grant the answer no longer stands for."""
        connections = self._ledger.get(key, {})
        ended = [
            conn
            for conn, admitted in connections.items()
            if not still_admits(self.policy, admitted.grant, answer_for(admitted))
        ]
        if not ended:
            return
        for conn in ended:
            del connections[conn]
            self._order.pop((key, *conn), None)
        if not connections:
            self._ledger.pop(key, None)
        task = asyncio.get_running_loop().create_task(self.kick(key, ended))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def kick(self, key: str, connections: list[tuple[str, int]]) -> None:
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


class _Absent(bytes):
    """A key a loaded copy has no record for."""


_ABSENT = _Absent()


def _answer(seen: StoreAnswer | bytes, admitted: _Admitted) -> StoreAnswer:
    """The store answer for a connection, from a change (already an answer) or a loaded copy's
    value. A key a load has no record for was deleted if the connection was admitted from a
    record; a soft-mode admit of a key that never had one stays a key with none (the copy
    holds live records only, so it cannot tell a delete from "never had one")."""
    if seen is _ABSENT:
        return Deleted() if admitted.had_record else Missing()
    if isinstance(seen, bytes):
        return Found(seen)
    return seen
