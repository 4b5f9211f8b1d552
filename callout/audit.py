"""The audit trail: one JetStream message per decision, on a stream with bounded retention.

The decision path only appends to a bounded in-memory buffer (`observe` never awaits, never
blocks); a background task drains it with JetStream async publishes, many acks outstanding
at once. So a slow, full or missing stream costs decisions nothing: messages wait in the
buffer, then are counted as lost (`callout_audit_lost_total{cause}`) when the buffer is full,
their ack does not come in time, or there is no stream. An unacknowledged message is retried
once with the same `Nats-Msg-Id`, which the stream de-duplicates, so a lost *ack* does not
store a message twice.

`Nats-Msg-Id` is the request id: the requesting server's id and the request's `user_nkey`,
which nats-server makes fresh for every request (docs/protocol.md §1). A replayed request carries
the same id, so a replay is a separate event with its own message id, not a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig

from callout import log
from callout.decision import REPLAY, Decision
from callout.metrics import Metrics, outcome

SUBJECT_PREFIX: Final = "callout.audit"
MSG_ID_HEADER: Final = "Nats-Msg-Id"
# JetStream's default de-duplication window; it cannot exceed the stream's max age.
DUPLICATE_WINDOW: Final = 120.0
BATCH: Final = 100


class AuditStreamError(Exception):
    """The stream cannot be created or is not ours to publish to (message for operators)."""


@dataclass(frozen=True, slots=True)
class AuditConfig:
    stream: str
    max_age: float  # seconds
    max_bytes: int
    replicas: int = 1
    buffer: int = 10_000  # decisions waiting to be published
    max_pending: int = 1_000  # publishes waiting for their ack
    ack_timeout: float = 2.0
    ensure_interval: float = 5.0  # how often a missing stream is re-created, at most
    linger: float = 0.1  # pause between batches: more messages per write
    stop_timeout: float = 5.0  # how long stop() waits for the buffer and acks
    subject_prefix: str = SUBJECT_PREFIX


@dataclass(slots=True)
class _Observed:
    decision: Decision
    latency: float
    at: float


@dataclass(slots=True)
class _Message:
    msg_id: str
    subject: str
    payload: bytes
    attempt: int = 0


def request_id(decision: Decision) -> str | None:
    request = decision.request
    if request is None:
        return None
    return f"{request.server_id}.{request.user_nkey}"


def permissions_hash(decision: Decision) -> str | None:
    """SHA-256 of the permissions in the user JWT we issued (admits only): lets an auditor see
    that two admits got the same, or different, permissions without storing the lists."""
    if not decision.admit:
        return None
    claims = orjson.dumps(decision.permissions.claims(), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(claims).hexdigest()


def audit_document(decision: Decision, latency: float, at: float) -> dict[str, Any]:
    request = decision.request
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    return {
        "time": stamp.replace("+00:00", "Z"),
        "request_id": request_id(decision),
        "server": request.server_id if request else None,
        "client": decision.client_key or None,
        "client_ip": (request.client_host or None) if request else None,
        "client_id": (request.client_id or None) if request else None,
        "decision": outcome(decision),
        "reason": decision.reason,
        "detail": decision.detail or None,
        "account": decision.account or None,
        "name": decision.name or None,
        "permissions_hash": permissions_hash(decision),
        "latency_ms": round(latency * 1000, 3),
    }


def message_for(decision: Decision, latency: float, at: float, prefix: str) -> _Message:
    rid = request_id(decision)
    if rid is None:
        msg_id = secrets.token_hex(16)  # not tied to a request: nothing to de-duplicate against
    elif decision.reason == REPLAY:
        msg_id = f"{rid}.replay.{secrets.token_hex(8)}"
    else:
        msg_id = rid
    payload = orjson.dumps(audit_document(decision, latency, at))
    return _Message(msg_id, f"{prefix}.{outcome(decision)}", payload)


async def ensure_stream(js: JetStreamContext, config: AuditConfig) -> bool:
    """Create the stream when missing; True if it was created. A stream of that name that does
    not take our subjects raises (we never rewrite an operator's stream)."""
    subjects = f"{config.subject_prefix}.>"
    try:
        info = await js.stream_info(config.stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(
                StreamConfig(
                    name=config.stream,
                    description="callout audit trail: one message per authorization decision",
                    subjects=[subjects],
                    retention=RetentionPolicy.LIMITS,
                    discard=DiscardPolicy.OLD,
                    storage=StorageType.FILE,
                    max_age=config.max_age,
                    max_bytes=config.max_bytes,
                    num_replicas=config.replicas,
                    duplicate_window=min(DUPLICATE_WINDOW, config.max_age),
                )
            )
        except nats.js.errors.APIError as exc:
            raise AuditStreamError(
                f"cannot create stream {config.stream!r}: {exc.description or exc.code}"
            ) from None
        return True
    have = list(info.config.subjects or [])
    if subjects not in have:
        raise AuditStreamError(
            f"stream {config.stream!r} exists with subjects {have}, not {subjects!r}"
        )
    return False


class Audit:
    def __init__(self, nc: Client, config: AuditConfig, metrics: Metrics) -> None:
        self.config = config
        self._nc = nc
        # Our own cap (max_pending) stays below nats-py's, so its semaphore never blocks.
        self._js = nc.jetstream(publish_async_max_pending=config.max_pending + 1)
        self._prefix = config.subject_prefix
        self._pending: set[asyncio.Future[PubAck]] = set()
        self._slot_freed = asyncio.Event()
        self._metrics = metrics
        self._queue: asyncio.Queue[_Observed | _Message] = asyncio.Queue(config.buffer)
        self._drain_task: asyncio.Task[None] | None = None
        self._ensure_task: asyncio.Task[None] | None = None
        self._last_ensure = float("-inf")
        self._failing: set[str] = set()  # causes of loss seen since the last stored message
        self._stopped = False

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        """Make sure the stream exists, best effort: a stream that is down now must not keep
        the service from serving, so a failure is logged and retried when publishing fails."""
        await self._ensure()
        self._drain_task = asyncio.create_task(self._drain())

    def observe(self, decision: Decision, latency: float) -> None:
        """`CalloutService.observers` entry. Never awaits: a full buffer loses the message."""
        try:
            self._queue.put_nowait(_Observed(decision, latency, time.time()))
        except asyncio.QueueFull:
            self._lost("buffer_full")

    async def stop(self) -> None:
        """Publish what is buffered (within `stop_timeout`), then count what is left as lost."""
        try:
            async with asyncio.timeout(self.config.stop_timeout):
                await self._queue.join()
                while self._pending:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
        except TimeoutError:
            pass
        for task in (self._drain_task, self._ensure_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = self._queue.qsize() + len(self._pending)
        self._stopped = True  # acks still in flight were just counted: ignore them now
        if left:
            self._metrics.audit_lost.labels(cause="shutdown").inc(left)
            log.warning("audit_unpublished_at_stop", messages=left)

    # -- draining -------------------------------------------------------------------------------
    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._publish(loop, await self._queue.get())
            # Publish everything already waiting without yielding, then pause: the connection's
            # flusher sends the batch in one write, and its acks come back together. One write
            # per message would cost the event loop (and so the decisions) far more.
            sent = 1
            while not self._queue.empty():
                await self._publish(loop, self._queue.get_nowait())
                sent += 1
                if sent % BATCH == 0:
                    await asyncio.sleep(0)  # let waiting decisions in between long batches
            await asyncio.sleep(self.config.linger)

    async def _publish(self, loop: asyncio.AbstractEventLoop, item: _Observed | _Message) -> None:
        try:
            if len(self._pending) >= self.config.max_pending:
                # The stream is slow: wait, at most an ack timeout, for an ack or a deadline to
                # free a slot; meanwhile the buffer absorbs (then loses) new decisions.
                try:
                    async with asyncio.timeout(self.config.ack_timeout):
                        while len(self._pending) >= self.config.max_pending:
                            self._slot_freed.clear()
                            await self._slot_freed.wait()
                except TimeoutError:
                    self._lost("timeout")
                    return
            if isinstance(item, _Observed):
                message = message_for(item.decision, item.latency, item.at, self._prefix)
            else:
                message = item
            try:
                # No wait_stall: nats-py would wrap every publish in a task to time it; the cap
                # above keeps its own semaphore from ever blocking.
                future = await self._js.publish_async(
                    message.subject,
                    message.payload,
                    stream=self.config.stream,
                    headers={MSG_ID_HEADER: message.msg_id},
                )
            except (nats.errors.Error, OSError):
                self._lost("error")
                return
            # nats-py's futures never time out by themselves: cancel at the ack deadline.
            deadline = loop.call_later(self.config.ack_timeout, future.cancel)
            self._pending.add(future)
            future.add_done_callback(lambda f: self._settled(f, message, deadline))
        except Exception as exc:  # never let one message end the drain
            self._lost("error")
            log.error("audit_error", exception=type(exc).__name__)
        finally:
            self._queue.task_done()

    def _settled(
        self, future: asyncio.Future[PubAck], message: _Message, deadline: asyncio.TimerHandle
    ) -> None:
        deadline.cancel()
        self._pending.discard(future)
        self._slot_freed.set()
        if self._stopped:
            return
        if future.cancelled():
            if message.attempt == 0:
                # The ack may have been lost rather than the message: send it again, the
                # stream drops it if it was stored (same Nats-Msg-Id).
                message.attempt = 1
                try:
                    self._queue.put_nowait(message)
                except asyncio.QueueFull:
                    self._lost("buffer_full")
                return
            self._lost("timeout")
            return
        exc = future.exception()
        if exc is None:
            if future.result().duplicate:
                self._metrics.audit_duplicates.inc()
            else:
                self._metrics.audit_published.inc()
            if self._failing:
                log.info("audit_recovered", stream=self.config.stream)
                self._failing.clear()
            return
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            self._lost("no_stream")
            self._schedule_ensure()
        else:
            detail = getattr(exc, "description", None) or type(exc).__name__
            self._lost("error", str(detail)[:200])

    def _lost(self, cause: str, detail: str = "") -> None:
        self._metrics.audit_lost.labels(cause=cause).inc()
        if cause not in self._failing:
            # Once per cause per outage, not once per message: a down stream would flood the log.
            log.warning("audit_lost", stream=self.config.stream, cause=cause, detail=detail)
            self._failing.add(cause)

    # -- the stream -----------------------------------------------------------------------------
    def _schedule_ensure(self) -> None:
        running = self._ensure_task is not None and not self._ensure_task.done()
        if running or time.monotonic() - self._last_ensure < self.config.ensure_interval:
            return
        self._ensure_task = asyncio.create_task(self._ensure())

    async def _ensure(self) -> None:
        self._last_ensure = time.monotonic()
        config = self.config
        try:
            async with asyncio.timeout(max(config.ack_timeout, 2.0)):
                created = await ensure_stream(self._js, config)
        except AuditStreamError as exc:
            log.warning("audit_stream_unavailable", stream=config.stream, detail=str(exc))
            return
        except (TimeoutError, nats.errors.Error) as exc:
            detail = getattr(exc, "description", None) or type(exc).__name__
            log.warning("audit_stream_unavailable", stream=config.stream, detail=str(detail))
            return
        if created:
            log.info(
                "audit_stream_created",
                stream=config.stream,
                subjects=f"{config.subject_prefix}.>",
                max_age_s=config.max_age,
                max_bytes=config.max_bytes,
            )
