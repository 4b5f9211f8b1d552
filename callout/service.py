"""The asyncio shell around the decision core: NATS in, store lookups, NATS out.

It owns the promises the core cannot keep by itself:
- every request is answered exactly once (one publish per message, on every path,
  exceptions included), except requests the server has certainly given up on;
- requests are handled concurrently, up to `max_inflight` at once. nats-py runs a
  subscription's callbacks one after another (docs/protocol.md §9, "Reconnect storms"), so the
  callback only starts a task or queues the message, and never waits;
- under a backlog the freshest request goes first: it is the one that can still make the
  server's deadline, while the oldest may already be lost. A backlog longer than
  `max_backlog` sheds its oldest request with an immediate deny (an empty body), never
  silence;
- no store lookup outlives its deadline (`Request.deadline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from callout import log
from callout.decision import (
    OVERLOADED,
    Authorizer,
    Decision,
    FirstSight,
    ReplayAnswer,
    Request,
    SeenBefore,
    StoreAnswer,
    TimedOut,
    Unavailable,
    store_answer,
)
from callout.recording import Recorder
from callout.store import Store, StoreError
from callout.store.replay import ReplayBucket

SUBJECT = "$SYS.REQ.USER.AUTH"


@dataclass
class Stats:
    requests: int = 0
    replies: int = 0
    dropped: int = 0
    shed: int = 0
    admitted: int = 0
    denied: int = 0
    errors: int = 0


@dataclass
class CalloutService:
    nc: Client
    authorizer: Authorizer
    store: Store
    queue: str = "callout"
    max_inflight: int = 256
    max_backlog: int = 20_000
    clock: Callable[[], float] = time.time
    stats: Stats = field(default_factory=Stats)
    # Called with every decision and its latency in seconds (metrics, audit). Must not block.
    observers: list[Callable[[Decision, float], None]] = field(default_factory=list)
    # The shared replay record (--replay-bucket), consulted beside the store lookup.
    replay: ReplayBucket | None = None
    # --record-dir: given every handled request (bytes as received) and its decision.
    recorder: Recorder | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _backlog: deque[tuple[Msg, float]] = field(default_factory=deque, init=False)
    _sub: Subscription | None = field(default=None, init=False)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(SUBJECT, queue=self.queue, cb=self._on_message)
        # The subscription is live on the server once a round trip has passed it.
        await self.nc.flush()
        policy = self.authorizer.policy
        log.info(
            "ready",
            subject=SUBJECT,
            queue=self.queue,
            mode=policy.mode,
            account=policy.account,
            xkey=bool(policy.xkeys),
            internal_keys=len(policy.internal_keys),
            max_inflight=self.max_inflight,
        )

    async def stop(self) -> None:
        """Stop taking requests and answer every one already taken."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                # Drain, not unsubscribe: requests the server already sent us are answered.
                await sub.drain()  # type: ignore[no-untyped-call]  # nats-py: untyped
            except Exception as exc:  # a dead connection cannot drain; answer what we hold
                log.warning("drain_failed", exception=type(exc).__name__)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        # Finishing a task starts the next backlog entry, so wait until both are empty.
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def subscribed(self) -> bool:
        return self._sub is not None

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    async def _on_message(self, msg: Msg) -> None:
        received = self.clock()
        self.stats.requests += 1
        if len(self._tasks) < self.max_inflight:
            self._spawn(msg, received)
            return
        if len(self._backlog) >= self.max_backlog:
            oldest, oldest_received = self._backlog.popleft()
            self.stats.shed += 1
            await self._reply(oldest, b"")
            shed = Decision(OVERLOADED, f"backlog over {self.max_backlog}")
            self._log(shed, oldest_received)
            self._record(oldest, oldest_received, shed)
        self._backlog.append((msg, received))

    def _spawn(self, msg: Msg, received: float) -> None:
        task = asyncio.create_task(self._handle(msg, received))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._backlog and len(self._tasks) < self.max_inflight:
            msg, received = self._backlog.pop()  # freshest first
            self._spawn(msg, received)

    async def _handle(self, msg: Msg, received: float) -> None:
        authorizer = self.authorizer
        request: Request | None = None
        try:
            opened = authorizer.open(msg.data, msg.headers, received)
            if isinstance(opened, Decision):
                decision = opened
            else:
                request = opened
                if request.internal:
                    decision = authorizer.decide(request, None)
                elif self.replay is None:
                    decision = authorizer.decide(request, await self._lookup(request, received))
                else:
                    answer, replay = await asyncio.gather(
                        self._lookup(request, received), self._check_replay(request, received)
                    )
                    decision = authorizer.decide(request, answer, replay)
            if decision.drop:
                self.stats.dropped += 1
                self._log(decision, received)
                self._record(msg, received, decision)
                return
            body = authorizer.respond(decision, self.clock())
        except Exception as exc:  # fail closed: a bug must deny, never admit or go silent
            decision = authorizer.fail(request, f"{type(exc).__name__} in handler")
            log.error("handler_error", exception=type(exc).__name__, client=decision.client_key)
            try:
                body = authorizer.respond(decision, self.clock())
            except Exception:
                body = b""  # the empty body is still an immediate deny
        await self._reply(msg, body)
        self._log(decision, received)
        self._record(msg, received, decision)

    async def _lookup(self, request: Request, received: float) -> StoreAnswer:
        budget = request.deadline(received, self.authorizer.policy.backend_timeout) - self.clock()
        if budget <= 0:
            return TimedOut()
        try:
            async with asyncio.timeout(budget):
                value = await self.store.get(request.client_key)
        except TimeoutError:
            return TimedOut()
        except StoreError as exc:
            return Unavailable(str(exc))
        return store_answer(value)

    async def _check_replay(self, request: Request, received: float) -> ReplayAnswer:
        assert self.replay is not None
        budget = request.deadline(received, self.authorizer.policy.backend_timeout) - self.clock()
        if budget <= 0:
            return TimedOut()
        try:
            async with asyncio.timeout(budget):
                first = await self.replay.first_sight(
                    request.server_id, request.user_nkey, request.nonce
                )
        except TimeoutError:
            return TimedOut()
        except StoreError as exc:
            return Unavailable(str(exc))
        return FirstSight() if first else SeenBefore()

    async def _reply(self, msg: Msg, body: bytes) -> None:
        if not msg.reply:
            log.warning("no_reply_subject", subject=msg.subject)
            return
        try:
            await self.nc.publish(msg.reply, body)
            self.stats.replies += 1
        except Exception as exc:
            # The connection is gone; the server will time the client out. Nothing else to do.
            self.stats.errors += 1
            log.error("reply_failed", exception=type(exc).__name__)

    def _record(self, msg: Msg, received: float, decision: Decision) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.record(msg.data, msg.headers, received, decision)
        except Exception as exc:  # the recorder's bug must not touch decisions
            log.error("recorder_error", exception=type(exc).__name__)

    def _log(self, decision: Decision, received: float) -> None:
        latency_ms = round((self.clock() - received) * 1000, 2)
        if decision.admit:
            self.stats.admitted += 1
        elif not decision.drop:
            self.stats.denied += 1
        request = decision.request
        fields: dict[str, object] = {
            "client": decision.client_key,
            "decision": "drop" if decision.drop else "admit" if decision.admit else "deny",
            "reason": decision.reason,
            "latency_ms": latency_ms,
        }
        if decision.detail:
            fields["detail"] = decision.detail
        if decision.admit:
            fields["account"] = decision.account
        if request is not None:
            fields["server"] = request.server_id
            if request.client_id:
                # With `server`, names the connection: the server's auth error event and
                # connz say `cid` too.
                fields["cid"] = request.client_id
            if request.client_host:
                fields["host"] = request.client_host
        log.info("decision", **fields)
        for observe in self.observers:
            try:
                observe(decision, latency_ms / 1000)
            except Exception as exc:  # an observer's bug must not touch decisions
                log.error("observer_error", exception=type(exc).__name__)
