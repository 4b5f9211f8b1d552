"""The service shell without a server: a fake NATS connection that records replies, a settable
clock, stores that hold or fail their reads on command, and `make_env`, which wires them to a
`Service` the way `callout serve` does."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import nkeys
from nats.aio.client import Client
from nats.aio.msg import Msg

from callout.decision import Authorizer, Decision, ReplayAnswer, Request, StoreAnswer
from callout.service import SUBJECT, CalloutService
from callout.store import WouldBlock
from callout.store.memory import MemoryStore
from tests.support import forge
from tests.support.forge import ClientKey, Forged, ServerIdentity
from tests.support.nats import Keys, make_keys
from tests.support.service import policy_for, record

NOW = 1_800_000_000.0


class FakeNC:
    """Stands in for the nats-py Client: records every publish, in order, in `events`."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.events = events
        self.fail = fail

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None
    ) -> None:
        self.events.append("publish")
        if self.fail:
            raise ConnectionError("connection closed")
        self.published.append((subject, payload))


@dataclass
class Clock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


class GatedStore:
    """A store whose lookups wait for `gate`; counts how many are in flight at once."""

    def __init__(self, events: list[str], records: dict[str, bytes] | None = None) -> None:
        self.events = events
        self.records = records or {}
        self.gate = asyncio.Event()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.reached: dict[int, asyncio.Event] = {}

    def when_active(self, n: int) -> asyncio.Event:
        return self.reached.setdefault(n, asyncio.Event())

    def get_nowait(self, key: str) -> bytes | None:
        raise WouldBlock

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.when_active(self.active).set()
        self.events.append("store_called")
        try:
            await self.gate.wait()
            self.events.append("store_answered")
            return self.records.get(key)
        except asyncio.CancelledError:
            self.events.append("store_cancelled")
            raise
        finally:
            self.active -= 1


class RaisingStore:
    """Raises from the awaited read, or (`nowait`) already from the synchronous one."""

    def __init__(self, exc: BaseException, nowait: bool = False) -> None:
        self.exc = exc
        self.nowait = nowait
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        raise self.exc

    def get_nowait(self, key: str) -> bytes | None:
        if self.nowait:
            self.calls += 1
            raise self.exc
        raise WouldBlock


@dataclass
class Env:
    keys: Keys
    server: ServerIdentity
    client: ClientKey
    service: CalloutService
    nc: FakeNC
    store: Any
    clock: Clock
    events: list[str] = field(default_factory=list)
    _n: int = 0

    def forge(self, **kwargs: Any) -> Forged:
        kwargs.setdefault("client", self.client)
        kwargs.setdefault("now", self.clock.now)
        return forge.forge_request(self.server, self.keys.issuer_pub, **kwargs)

    def msg(self, forged: Forged | bytes, reply: str | None = None) -> Msg:
        self._n += 1
        payload, headers = (
            (forged, None) if isinstance(forged, bytes) else (forged.payload, forged.headers)
        )
        return Msg(
            _client=cast(Client, self.nc),
            subject=SUBJECT,
            reply=reply if reply is not None else f"$SYS._INBOX.abcdef.{self._n:08d}",
            data=payload,
            headers=headers,
        )

    async def handle(self, msg: Msg) -> None:
        """One request through the subscription callback and any task it started, bounded so
        a hang fails instead of waits."""

        async def run() -> None:
            await self.service._on_message(msg)
            await self.service.stop()

        await asyncio.wait_for(run(), 10)

    def reply_claims(self, body: bytes, forged: Forged) -> dict[str, Any]:
        claims = forge.decode_jwt(body, nkeys.PREFIX_BYTE_ACCOUNT)
        assert claims["iss"] == self.keys.issuer_pub
        assert claims["sub"] == forged.user_nkey
        assert claims["aud"] == self.server.public
        return claims

    def only_reply(self, msg: Msg) -> bytes:
        assert [subject for subject, _ in self.nc.published] == [msg.reply]
        return self.nc.published[0][1]

    def error_of(self, msg: Msg, forged: Forged) -> str:
        nats = self.reply_claims(self.only_reply(msg), forged)["nats"]
        assert "jwt" not in nats, "an admit"
        error: str = nats["error"]
        return error

    async def hold_then_drain(self, store: GatedStore, msgs: list[Any], active: int = 1) -> None:
        """Deliver `msgs` while the store holds its reads, wait until `active` lookups are in
        it, then let them through and stop the service (which waits for every request)."""
        for m in msgs:
            await self.service._on_message(m)
        await asyncio.wait_for(store.when_active(active).wait(), 10)
        store.gate.set()
        await asyncio.wait_for(self.service.stop(), 10)


def make_env(
    store: Any = None,
    *,
    authorizer: type[Authorizer] = Authorizer,
    max_inflight: int = 16,
    fail_publish: bool = False,
    records: dict[str, bytes] | None = None,
    **policy: Any,
) -> Env:
    keys = make_keys()
    client = ClientKey.generate()
    events: list[str] = []
    nc = FakeNC(events, fail=fail_publish)
    clock = Clock()
    if store is None:
        store = MemoryStore(records={client.public: record("alice", pub_allow=["a.>"])})
    if records:
        store.records.update(records)
    service = CalloutService(
        cast(Client, nc),
        authorizer(policy_for(keys, **policy)),
        store,
        max_inflight=max_inflight,
        clock=clock,
    )
    return Env(keys, ServerIdentity.generate(), client, service, nc, store, clock, events)


class DecideRaises(Authorizer):
    def decide(
        self, request: Request, answer: StoreAnswer | None, replay: ReplayAnswer | None = None
    ) -> Decision:
        raise RuntimeError("bug in decide")


class OpenRaises(Authorizer):
    def open(self, payload: bytes, headers: Any, now: float) -> Request | Decision:
        raise RuntimeError("bug in open")


class AdmitRespondRaises(Authorizer):
    def respond(self, decision: Decision, now: float, jitter: float | None = None) -> bytes:
        if decision.admit:
            raise RuntimeError("bug while building the user JWT")
        return Authorizer.respond(self, decision, now, jitter)


class RespondRaises(Authorizer):
    def respond(self, decision: Decision, now: float, jitter: float | None = None) -> bytes:
        raise RuntimeError("bug in respond")
