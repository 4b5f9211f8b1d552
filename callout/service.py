"""The asyncio shell around the decision core: NATS in, store lookups, NATS out.

It owns the promises the core cannot keep by itself:
- every request is answered exactly once (one publish per message, on every path,
  exceptions included), except requests the server has certainly given up on;
- a request that needs no I/O (every gate-1/2 deny, an internal key, a lookup the users
  cache answers from memory: nearly all of them in a reconnect storm) is decided and
  answered inside the subscription callback, with no task and no await. nats-py runs a
  subscription's callbacks one after another, so these are answered in arrival order: the
  oldest request, the one closest to the server's timeout, goes first;
- the callback hands the event loop back every `SLICE` seconds of such work, so the replies
  already decided are written out (nats-py's flusher) while a backlog is worked off;
- a request that needs I/O (a lookup the cache cannot answer, the shared replay record) gets
  its own task, up to `max_inflight` at once; the others wait their turn, oldest first;
- a backlog longer than `max_backlog` (requests received and not yet started) sheds its
  oldest request with an immediate deny (an empty body), never silence;
- no store lookup outlives its deadline (`Request.deadline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from callout import log
from callout.decision import (
    INTERNAL_ERROR,
    OVERLOADED,
    Answer,
    Authorizer,
    Decision,
    FirstSight,
    Pending,
    ReplayAnswer,
    SeenBefore,
    StoreAnswer,
    TimedOut,
    Unavailable,
    store_answer,
)
from callout.recording.writer import Recorder
from callout.store import Store, StoreError
from callout.store.seen import SeenRecord

SUBJECT = "$SYS.REQ.USER.AUTH"
# Longest run of callback work (seconds) before the event loop gets a turn: bounds how long a
# decided reply waits to be written while a backlog is worked off, at one loop turn each.
SLICE: Final = 0.005

T = TypeVar("T")

LogDecisions = Literal["all", "deny", "none"]
LOG_DECISIONS: Final = ("all", "deny", "none")


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
    seen: SeenRecord | None = None
    # --record-dir: given every handled request (bytes as received) and its decision.
    recorder: Recorder | None = None
    # --log-decisions: which decisions get a log line (all, denies and drops only, none).
    log_decisions: LogDecisions = "all"
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    # Requests that need I/O and wait for a free task, oldest first.
    _waiting: deque[tuple[Msg, float, Pending]] = field(default_factory=deque, init=False)
    _sub: Subscription | None = field(default=None, init=False)
    # When the current run of callback work began (monotonic); None once the loop had a turn.
    _slice_began: float | None = field(default=None, init=False)

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
        # Finishing a task starts the next waiting request, so wait until both are empty.
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def subscribed(self) -> bool:
        return self._sub is not None

    @property
    def inflight(self) -> int:
        """Requests waiting on I/O (a store lookup, the shared replay record)."""
        return len(self._tasks)

    @property
    def backlog(self) -> int:
        """Requests received and not started: in the subscription's queue, or decided as far
        as they go without I/O and waiting for a task."""
        return self._queued() + len(self._waiting)

    def _queued(self) -> int:
        sub = self._sub
        return sub.pending_msgs if sub is not None else 0

    # -- receiving ----------------------------------------------------------------------------
    async def _on_message(self, msg: Msg) -> None:
        received = self.clock()
        self.stats.requests += 1
        if self._queued() + len(self._waiting) >= self.max_backlog:
            if not self._waiting:
                # This one is the oldest (the subscription's queue is in arrival order).
                await self._shed(msg, received)
                await self._pace()
                return
            oldest, oldest_received, _ = self._waiting.popleft()
            await self._shed(oldest, oldest_received)
        try:
            started = self.authorizer.start(
                msg.data,
                msg.headers,
                received,
                self.store.get_nowait,
                replay=self.seen is not None,
            )
        except Exception as exc:  # start is total; this only guards the shell's own bug
            started = Answer(self.authorizer.fail(None, f"{type(exc).__name__} in the shell"), b"")
        if isinstance(started, Pending):
            self._wait_for_io(msg, received, started)
        else:
            await self._finish(msg, received, started)
        await self._pace()

    async def _pace(self) -> None:
        """Give the event loop a turn once this run of callback work has lasted `SLICE`."""
        if not self._queued():
            return  # nothing waits: the subscription's task hands the loop its turn itself
        now = time.monotonic()
        if self._slice_began is None:
            self._slice_began = now
            asyncio.get_running_loop().call_soon(self._slice_ended)
        elif now - self._slice_began >= SLICE:
            await asyncio.sleep(0)

    def _slice_ended(self) -> None:
        self._slice_began = None

    async def _shed(self, msg: Msg, received: float) -> None:
        self.stats.shed += 1
        shed = Decision(OVERLOADED, f"backlog over {self.max_backlog}")
        await self._finish(msg, received, Answer(shed, b""))

    # -- requests that need I/O ---------------------------------------------------------------
    def _wait_for_io(self, msg: Msg, received: float, pending: Pending) -> None:
        if len(self._tasks) < self.max_inflight:
            self._spawn(msg, received, pending)
            return
        self._waiting.append((msg, received, pending))

    def _spawn(self, msg: Msg, received: float, pending: Pending) -> None:
        task = asyncio.create_task(self._resolve(msg, received, pending))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._waiting and len(self._tasks) < self.max_inflight:
            self._spawn(*self._waiting.popleft())  # oldest first: the earliest deadline

    async def _resolve(self, msg: Msg, received: float, pending: Pending) -> None:
        authorizer = self.authorizer
        from_store: StoreAnswer | None = None
        replay_answer: ReplayAnswer | None = None
        try:
            if pending.wants_store and pending.replay:
                from_store, replay_answer = await asyncio.gather(
                    self._lookup(pending, received), self._check_seen(pending, received)
                )
            elif pending.wants_store:
                from_store = await self._lookup(pending, received)
            elif pending.replay:
                replay_answer = await self._check_seen(pending, received)
            answer = authorizer.resume(pending, from_store, replay_answer, self.clock())
        except Exception as exc:  # a bug in the I/O: deny, never admit or go silent
            answer = authorizer.abort(pending, f"{type(exc).__name__} in a lookup", self.clock())
        await self._finish(msg, received, answer)

    async def _lookup(self, pending: Pending, received: float) -> StoreAnswer:
        key = pending.request.client_key
        got = await self._before_deadline(pending, received, lambda: self.store.get(key))
        return got if isinstance(got, TimedOut | Unavailable) else store_answer(got)

    async def _check_seen(self, pending: Pending, received: float) -> ReplayAnswer:
        seen, request = self.seen, pending.request
        assert seen is not None
        got = await self._before_deadline(
            pending,
            received,
            lambda: seen.first_sight(request.server_id, request.user_nkey, request.nonce),
        )
        if isinstance(got, TimedOut | Unavailable):
            return got
        return FirstSight() if got else SeenBefore()

    async def _before_deadline(
        self, pending: Pending, received: float, read: Callable[[], Awaitable[T]]
    ) -> T | TimedOut | Unavailable:
        """`read()`, abandoned at the request's deadline; a store failure as its answer."""
        deadline = pending.request.deadline(received, self.authorizer.policy.backend_timeout)
        budget = deadline - self.clock()
        if budget <= 0:
            return TimedOut()
        try:
            async with asyncio.timeout(budget):
                return await read()
        except TimeoutError:
            return TimedOut()
        except StoreError as exc:
            return Unavailable(str(exc))

    # -- answering ----------------------------------------------------------------------------
    async def _finish(self, msg: Msg, received: float, answer: Answer) -> None:
        decision = answer.decision
        latency = self.clock() - received
        if decision.admit:
            self.stats.admitted += 1
        elif not decision.drop:
            self.stats.denied += 1
        if decision.reason == INTERNAL_ERROR:
            log.error("handler_error", detail=decision.detail, client=decision.client_key)
        # Logged first: the line is written at the loop's next turn, before nats-py's flusher
        # (woken by the publish below) writes the reply, so a decision seen on the wire is
        # already in the log.
        self._log(decision, latency)
        if answer.body is None:
            self.stats.dropped += 1
        else:
            await self._reply(msg, answer.body)
        for observe in self.observers:
            try:
                observe(decision, latency)
            except Exception as exc:  # an observer's bug must not touch decisions
                log.error("observer_error", exception=type(exc).__name__)
        self._record(msg, received, decision)

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

    def _log(self, decision: Decision, latency: float) -> None:
        try:
            self._log_line(decision, latency)
        except Exception as exc:  # the line is lost, never the reply that follows it
            log.error("log_error", exception=type(exc).__name__)

    def _log_line(self, decision: Decision, latency: float) -> None:
        admit = decision.admit
        if self.log_decisions == "all" or (self.log_decisions == "deny" and not admit):
            request = decision.request
            fields: dict[str, object] = {
                "client": decision.client_key,
                "decision": "drop" if decision.drop else "admit" if admit else "deny",
                "reason": decision.reason,
                "latency_ms": round(latency * 1000, 2),
            }
            if decision.detail:
                fields["detail"] = decision.detail
            if admit:
                fields["account"] = decision.account
            if request is not None:
                fields["server"] = request.server_id
                if request.client_id:
                    # With `server`, names the connection: the server's auth error event and
                    # connz say `cid` too.
                    fields["cid"] = request.client_id
                if request.client_host:
                    fields["host"] = request.client_host
            log.info_fields("decision", fields)
