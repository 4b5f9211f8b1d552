"""A users-bucket cache kept current by a KV watch, so a lookup costs no round trip.

Fail-closed rule: the cache answers only while it is *live*; otherwise every lookup goes to
the bucket directly (`KVStore`, within the caller's deadline), never to what the cache
remembers. Live means all of:

- the watch delivered the bucket's whole current state (the initial-load marker);
- the connection has not dropped since that load (a drop forces a full reload);
- a probe of the stream, every `probe_interval`, found nothing the watch had not delivered
  by the time of the previous probe, and such a check succeeded within `max_unverified`
  seconds (2 s). A write is normally seen within milliseconds; a watch that stalls, a bucket
  deleted (or deleted and re-created) or purged is noticed within two probe intervals and
  the cache stops answering; JetStream not answering a probe within 0.5 s, likewise. A
  probe whose answer we could not read in time because our own event loop was lagging (a
  connect storm) is no evidence either way: the copy keeps answering until its last
  confirmation is `max_unverified` old.

Between probes a dead watch is harmless unless someone writes, and a write is what the next
probe compares against, so the staleness bound holds without per-lookup round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from callout import log
from callout.store.base import StoreError, WouldBlock
from callout.store.kv import KVStore, is_delete, stream_name


class _ProbeTimeout(Exception):
    """A probe unanswered while our own event loop was lagging: no evidence either way."""


# How late a timeout must fire to count as our event loop lagging rather than JetStream.
_LOOP_LAG = 0.1


@dataclass
class _Probe:
    last_seq: int
    created: str
    # Subjects (keys, deleted ones included) holding a message: a purge that removes keys
    # sends no message to the watch, but it does drop this below the keys we hold.
    num_subjects: int
    messages: int
    taken_at: float  # monotonic time the probe was sent


class WatchedStore:
    """`Store` answering from a watched copy of the bucket while that copy is provably current."""

    def __init__(
        self,
        nc: Client,
        bucket: str = "users",
        *,
        direct: KVStore | None = None,
        probe_interval: float = 0.25,
        retry_interval: float = 1.0,
        max_unverified: float = 2.0,
    ) -> None:
        self._nc = nc
        self.bucket = bucket
        self._direct = direct or KVStore(nc, bucket)
        self._probe_interval = probe_interval
        # Bounds how long a stalled JetStream goes unnoticed (with the interval: ~0.75 s).
        self._probe_timeout = max(probe_interval * 2, 0.5)
        # The copy answers only while a probe has confirmed it within this many seconds.
        self._max_unverified = max_unverified
        self._verified_at = 0.0
        self._retry_interval = retry_interval
        self._info_subject = f"$JS.API.STREAM.INFO.{stream_name(bucket)}"
        self._subject_prefix = f"$KV.{bucket}."
        self._last_error = ""
        self._records: dict[str, bytes] = {}
        self._deleted: set[str] = set()
        self._seen_seq = 0
        self._live = False
        self.state = "loading"  # loading | live | lagging | disconnected | unavailable
        self.loads = 0
        self.load_seconds = 0.0
        self._task: asyncio.Task[None] | None = None
        self._restart = asyncio.Event()
        self._stopping = False
        # Set while live; for readiness checks and tests that wait for the first load.
        self.live_event = asyncio.Event()
        # Called with (key, old value, new value) for every change after the first load
        # (live revocation). Must not block.
        self.listeners: list[Callable[[str, bytes | None, bytes | None], None]] = []
        self._last_live: dict[str, bytes] | None = None

    # -- Store --------------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        if self._current():
            return self._records.get(key)
        return await self._direct.get(key)

    def get_nowait(self, key: str) -> bytes | None:
        if self._current():
            return self._records.get(key)
        raise WouldBlock

    def _current(self) -> bool:
        """Whether the copy may answer now (see the module's fail-closed rule)."""
        return self._live and time.monotonic() - self._verified_at <= self._max_unverified

    @property
    def live(self) -> bool:
        return self._live

    @property
    def size(self) -> int:
        return len(self._records)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="users-watch")

    async def stop(self) -> None:
        # The flag as well as the cancel: a cancel landing as an asyncio.timeout expires can be
        # absorbed (Python 3.11), and the loops must still end.
        self._stopping = True
        self._restart.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
            self._task = None
        self._go_dark("stopped")

    def disconnected(self) -> None:
        """From the connection's disconnected callback: stop answering at once."""
        self._go_dark("disconnected")
        self._restart.set()

    def reconnected(self) -> None:
        """From the connection's reconnected callback: reload now rather than at the next retry."""
        self._restart.set()

    def _notify(self, key: str, old: bytes | None, new: bytes | None) -> None:
        for listener in self.listeners:
            try:
                listener(key, old, new)
            except Exception as exc:  # a listener's bug must not stop the watch
                log.error("users_cache_listener_error", exception=type(exc).__name__)

    def _go_dark(self, state: str) -> None:
        if self._live:
            log.warning("users_cache_not_live", bucket=self.bucket, state=state)
        self._live = False
        self.live_event.clear()
        self.state = state
        self._records = {}

    # -- the watch ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            self._restart.clear()
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: stop answering, then reload from scratch
                keep = self.state in ("disconnected", "lagging")
                self._go_dark(self.state if keep else "unavailable")
                detail = f"{type(exc).__name__}: {str(exc)[:200]}"
                if detail != self._last_error:  # once per distinct failure, not every retry
                    log.warning("users_cache_error", bucket=self.bucket, detail=detail)
                    self._last_error = detail
            else:
                self._last_error = ""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry_interval):
                    await self._restart.wait()

    async def _watch_once(self) -> None:
        if not self._nc.is_connected:
            raise StoreError("not connected")
        started = time.monotonic()
        # Our own ordered consumer rather than nats-py's KeyWatcher: applying each message in
        # the subscription callback loads 100,000 users about 3x faster than its queue of
        # Entry objects. Last value per key first, then every change.
        records: dict[str, bytes] = {}
        # Keys whose last message is a delete marker: the stream counts them as subjects too,
        # which the purge check below must allow for.
        deleted: set[str] = set()
        self._deleted = deleted
        loaded = asyncio.Event()
        prefix = len(self._subject_prefix)

        async def on_message(msg: Msg) -> None:
            meta = msg.metadata
            key = msg.subject[prefix:]
            headers = msg.headers
            old = records.get(key)
            if is_delete(headers):
                records.pop(key, None)
                deleted.add(key)
                new = None
            else:
                records[key] = new = msg.data
                deleted.discard(key)
            if loaded.is_set() and old != new:
                self._notify(key, old, new)
            if meta.sequence.stream > self._seen_seq:
                self._seen_seq = meta.sequence.stream
            progress.set()
            if meta.num_pending == 0:
                loaded.set()

        self._seen_seq = 0
        before = await self._probe()  # what the load must reach; raises if there is no bucket
        progress = asyncio.Event()
        js = self._nc.jetstream()
        try:
            sub = await js.subscribe(
                self._subject_prefix + ">",
                stream=stream_name(self.bucket),
                cb=on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                # The initial load arrives as fast as the server sends it.
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
        except nats.js.errors.NotFoundError:
            raise StoreError(f"bucket {self.bucket!r} does not exist") from None
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and sub.delivered == 0:
                loaded.set()  # an empty bucket sends nothing to mark the end of the load
            await loaded.wait()
            # A fresh consumer can report nothing pending before it has caught up (seen on R3
            # clusters): the load is complete only once it reached what the stream held before
            # we subscribed (its last message is always the last of its key, so it comes).
            while before.messages and self._seen_seq < before.last_seq:
                progress.clear()
                try:
                    async with asyncio.timeout(self._probe_timeout * 5):
                        await progress.wait()
                except TimeoutError:
                    raise StoreError("initial load stalled") from None
            # Changes made while we were not watching (a reconnect, a reload) are found by
            # comparing with the last copy that was live.
            previous, self._last_live = self._last_live, records
            if self.listeners and previous is not None:
                for key in previous.keys() | records.keys():
                    if previous.get(key) != records.get(key):
                        self._notify(key, previous.get(key), records.get(key))
            self._records = records
            # Writes that landed during the load are on their way; the next probe checks them.
            probe = await self._probe()
            if self._restart.is_set() or self._stopping:
                # A disconnect (or stop) while loading: this copy may already be behind.
                raise StoreError("restart requested during the load")
            self._verified_at = before.taken_at
            self._live, self.state = True, "live"
            self.live_event.set()
            self.loads += 1
            self.load_seconds = time.monotonic() - started
            log.info(
                "users_cache_live",
                bucket=self.bucket,
                users=len(records),
                load_ms=round(self.load_seconds * 1000, 1),
            )
            await self._follow(probe)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _follow(self, previous: _Probe) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._probe_interval):
                    await self._restart.wait()
                    raise StoreError("restart requested")
            try:
                probe = await self._probe()
            except _ProbeTimeout:
                # No answer is no evidence either way (under a connect storm it is usually our
                # own busy event loop). `get` stops trusting the copy once the last check is
                # older than max_unverified; here, keep trying until then.
                if time.monotonic() - self._verified_at > self._max_unverified:
                    raise StoreError("stream probes unanswered") from None
                continue
            if probe.created != previous.created or probe.last_seq < self._seen_seq:
                self._go_dark("unavailable")  # before any await: the copy is known stale
                raise StoreError("bucket was re-created")
            # A purge sends the watch nothing, but leaves fewer subjects than keys we know of.
            if probe.num_subjects < len(self._records) + len(self._deleted):
                self._go_dark("unavailable")
                raise StoreError("keys were purged from the bucket")
            # Everything the stream held at the previous probe must have arrived by now.
            if self._seen_seq < previous.last_seq:
                self._go_dark("lagging")
                raise StoreError(f"watch lagging at {self._seen_seq} < {previous.last_seq}")
            # The copy is known to hold every write made before the previous probe was sent.
            self._verified_at = previous.taken_at
            previous = probe

    async def _probe(self) -> _Probe:
        # Raw STREAM.INFO: nats-py's StreamState drops num_subjects.
        sent = time.monotonic()
        try:
            msg = await self._nc.request(self._info_subject, b"", timeout=self._probe_timeout)
            doc = orjson.loads(msg.data)
        except nats.errors.TimeoutError:
            # Was it JetStream, or us? A timeout that fired well after it was due means our
            # event loop was too busy to read the answer (a connect storm): no evidence. One
            # on time means JetStream did not answer: the copy can no longer be trusted.
            if time.monotonic() - sent > self._probe_timeout + _LOOP_LAG:
                raise _ProbeTimeout from None
            raise StoreError("stream probe unanswered (JetStream stalled?)") from None
        except (nats.errors.Error, orjson.JSONDecodeError) as exc:
            raise StoreError(f"stream probe failed: {type(exc).__name__}") from None
        error = doc.get("error") if isinstance(doc, dict) else "not an object"
        if error is not None:
            raise StoreError(f"stream probe: {str(error)[:200]}")
        state = doc.get("state") or {}
        return _Probe(
            int(state.get("last_seq") or 0),
            str(doc.get("created")),
            int(state.get("num_subjects") or 0),
            int(state.get("messages") or 0),
            sent,
        )
