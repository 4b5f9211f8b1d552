"""A users-bucket cache kept current by a watch, so a lookup costs no round trip.

The contract (README, "The users cache"): the copy answers a lookup only while it is
*confirmed* for that lookup; otherwise the lookup goes to the bucket directly (`KVStore`,
within the caller's deadline, failing closed), never to what the copy remembers.

Confirmed means: a probe sent at most `window` seconds (80 ms) before the lookup was asked
showed the store there and nothing in it the copy lacks. A lookup asked when the last
confirmation is older waits for the next one while the leader is answering probes (a
saturated server answers later than the window; see `_confirmed_for`). Two kinds of probe:

- the *leader probe*, STREAM.INFO every `probe_interval` (20 ms), answered by the stream's
  leader. Its `last_seq` is the last write the leader has acknowledged; once the watch has
  delivered up to it, the copy holds every write acknowledged before the probe was sent, and
  the probe confirms the copy from its send time. The same answer tells a deleted or re-created
  bucket (an error, a new `created`), JetStream switched off (an error) and a purge (fewer
  subjects than the keys the copy knows), and the copy is dropped at once;
- the *replica probe*, a direct get of the stream's last message, answered by any replica
  (the stream needs `allow_direct`). It is sent only while the leader is silent, and confirms
  the copy only when the answering replica holds no write the copy lacks, the leader has not
  said the copy is behind, and the leader's last confirmation is under `election_limit` (10 s)
  old. This keeps the copy answering through a stream-leader election, when nothing can be
  written. While the leader is silent, a lookup the copy cannot answer in time goes to a
  replica's direct get instead of the leader, the newer of the replica's record and the
  copy's winning, provided a replica holds every write the leader last reported.

  What this cannot cover: a write the leader acknowledged in the instant before it died. The
  followers apply a write (and a watch served by one delivers it) a millisecond or two after
  the leader acknowledges it; in between, no reachable copy of the bucket holds it until a
  new leader applies it, about 5 s later, and the copy cannot know of it.

Where JetStream announces a loss, the copy stops answering on the announcement rather than at
the next probe: the stream-deleted advisory drops it, the watch connection's disconnect stops
it (the copy is kept: after the reconnect the watch resumes from the copy's next sequence, as
it does when its consumer is deleted or skips a message, and the copy answers again once a
probe confirms it). Anything the
store does not announce (JetStream switched off by a config reload, a purge, a stalled or
vanished server) ends the copy's answers within `window` of the last probe that saw the store
well, because nothing confirms it any more.

The watch and the probes run on a thread of their own, with their own event loop and NATS
connection: a confirmation is a timestamp the decision path compares with the clock, so
neither bound depends on the service's event loop being idle. A busy service loop neither
stretches how long a lost store is trusted (the thread stops confirming on time), nor turns a
live store into denials (the thread keeps confirming on time).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from callout import log
from callout.store.base import TOMBSTONE, StoreError, WouldBlock
from callout.store.kv import KVStore, is_delete, stream_name

#: Builds the watch's own connection on the watch thread's event loop, given the callbacks
#: (`disconnected_cb`, `reconnected_cb`, ...) to register.
Connect = Callable[[dict[str, Callable[..., Awaitable[None]]]], Awaitable[Client]]

# JetStream API error codes (nats-server server/errors.json).
_NO_MESSAGE = 10037
_STREAM_NOT_FOUND = 10059
_NS = 1_000_000_000
# Leader probes kept waiting for the watch to cover them.
_MAX_PENDING = 64
# Probes of one kind awaiting an answer at once.
_MAX_IN_FLIGHT = 16
# How often a direct read still waiting looks whether the copy can answer instead.
_RECHECK = 0.01
# Messages the copy may take from a replica rather than wait for the watch.
_MAX_CATCH_UP = 100


class _Lost(Exception):
    """The copy can no longer be trusted: drop it and load the bucket again."""


@dataclass(frozen=True, slots=True)
class _View:
    """What the decision path reads, in one attribute so one read is consistent: the copy, and
    until when (monotonic seconds) it may answer."""

    records: Mapping[str, bytes]
    deleted: frozenset[str] | set[str]
    until: float
    # The stream has no leader (an election) and the copy holds everything a replica does:
    # past `until`, a lookup is answered by a replica's direct get, checked against the copy.
    election: bool = False


_DARK = _View({}, frozenset(), 0.0)


def _answer(view: _View, key: str) -> bytes | None:
    """The copy's answer for `key`: its record, `TOMBSTONE` for a delete marker (soft mode must
    tell a deleted user from one that never had a record), None for a key never written."""
    value = view.records.get(key)
    if value is None and key in view.deleted:
        return TOMBSTONE
    return value


class WatchedStore:
    """`Store` answering from a watched copy of the bucket while that copy is confirmed."""

    def __init__(
        self,
        nc: Client,
        bucket: str = "users",
        *,
        connect: Connect,
        direct: KVStore | None = None,
        probe_interval: float = 0.02,
        window: float = 0.08,
        probe_timeout: float = 0.5,
        heartbeat: float = 0.25,
        election_limit: float = 10.0,
        retry_interval: float = 0.25,
    ) -> None:
        if window <= probe_interval:
            raise ValueError("the window must be longer than the probe interval")
        self.bucket = bucket
        self._connect = connect
        self._direct = direct or KVStore(nc, bucket)
        self._probe_interval = probe_interval
        self._window = window
        self._probe_timeout = probe_timeout
        self._heartbeat = heartbeat
        self._election_limit = election_limit
        self._retry_interval = retry_interval
        self._stream = stream_name(bucket)
        self._info_subject = f"$JS.API.STREAM.INFO.{self._stream}"
        self._direct_subject = f"$JS.API.DIRECT.GET.{self._stream}"
        self._subject_prefix = f"$KV.{bucket}."
        # Read by the decision path; the watch thread replaces the view, never changes it, and
        # updates the records in it in place, one dict operation at a time (atomic under the GIL).
        self._view = _DARK
        self._main_down = False
        self.state = "loading"  # loading | live | election | disconnected | unavailable | stopped
        self.loads = 0
        self.load_seconds = 0.0
        # Set while the copy is loaded and confirmed; for readiness checks and tests.
        self.live_event = asyncio.Event()
        # Called on the service's loop with (key, old value, new value) for every change after
        # the first load, changes found by a reload included (live revocation). Must not block.
        self.listeners: list[Callable[[str, bytes | None, bytes | None], None]] = []
        # Called on the service's loop with the whole copy (key -> record) after every load,
        # the first included, before the copy answers.
        self.load_listeners: list[Callable[[Mapping[str, bytes]], None]] = []
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._monitor: _Monitor | None = None
        self._changes: collections.deque[tuple[str, bytes | None, bytes | None]] = (
            collections.deque()
        )
        self._drain_scheduled = False
        # Lookups waiting in `_confirmed_for`, and the event that wakes them (replaced on every
        # new view, so each wait sees the next one).
        self._waiting = 0
        self._changed = asyncio.Event()

    # -- Store --------------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        asked = time.monotonic()
        view = self._view
        if asked < view.until and not self._main_down:
            return _answer(view, key)
        if view.election and not self._main_down:
            return await self._through_election(key, view)
        confirmed = await self._confirmed_for(asked)
        if confirmed is not None:
            return _answer(confirmed, key)
        view = self._view
        if view.election and not self._main_down:
            return await self._through_election(key, view)
        return await self._from_the_bucket(key)

    async def _confirmed_for(self, asked: float) -> _View | None:
        """Wait for a confirmation that covers a lookup asked at `asked`: one from a probe sent
        at most `window` before it, the bound an answer given at once has too. Returns the view
        so confirmed (the answer must come from that view, not from one read later, which the
        watch thread may have replaced with an empty one), or None.

        A saturated server (a connect storm on a small box) answers probes later than the
        window, so the copy is never confirmed *now*; each late answer still proves the copy
        held every write acknowledged before its probe was sent. Sending the waiting lookups to
        the bucket instead would queue one JetStream request per lookup behind the probes on
        the same saturated server. The wait lasts while the leader answers probes within the
        probe timeout; when it falls silent for longer (stalled, gone) or an election begins,
        the lookup goes to the bucket or a replica as any other."""
        while self.state == "live" and not self._main_down and not self._view.election:
            # Counted as waiting before the view is read: a view the watch thread publishes
            # after this read wakes this wait.
            changed = self._changed
            self._waiting += 1
            try:
                view = self._view
                if view.until >= asked:  # until = the confirming probe's send time + window
                    return view
                monitor = self._monitor
                silent = monitor is None or (
                    time.monotonic() - monitor.leader_answered > self._probe_timeout
                )
                if silent:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._window):
                        await changed.wait()
            finally:
                self._waiting -= 1
        return None

    async def _from_the_bucket(self, key: str) -> bytes | None:
        """A direct read (from the stream's leader), unless the copy becomes answerable first:
        when the leader has just died, the read waits for the caller's deadline, while the
        copy (or a replica) is confirmed again within milliseconds."""
        read = asyncio.ensure_future(self._direct.get(key))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=_RECHECK)
                if done:
                    return read.result()
                view = self._view
                if self._main_down:
                    continue
                if time.monotonic() < view.until:
                    return _answer(view, key)
                if view.election:
                    return await self._through_election(key, view)
        finally:
            read.cancel()

    async def _through_election(self, key: str, view: _View) -> bytes | None:
        """While the stream elects a leader, `get` (which needs one) cannot answer; a replica
        can. Its answer, sent after the request came, proves the store is there; the copy is at
        least as current as that replica (the monitor checks), so the newer of the two wins."""
        monitor = self._monitor
        seen = monitor.seen if monitor is not None else 0
        try:
            entry = await self._direct.get_from_a_replica(key)
        except StoreError:
            # No replica answered (one that restarts serves direct gets only once caught
            # up): the leader may be back by now; the caller's deadline bounds the wait.
            return await self._direct.get(key)
        if entry is not None and entry[1] > seen:
            # A write the copy has not had yet.
            return TOMBSTONE if entry[0] is None else entry[0]
        return _answer(view, key)

    def get_nowait(self, key: str) -> bytes | None:
        """The same rule as `get`: the copy's answer when `get` would give it, else WouldBlock."""
        view = self._view
        if time.monotonic() < view.until and not self._main_down:
            return _answer(view, key)
        raise WouldBlock

    @property
    def live(self) -> bool:
        return time.monotonic() < self._view.until and not self._main_down

    @property
    def size(self) -> int:
        return len(self._view.records)

    def deleted(self, key: str) -> bool:
        """Whether the copy holds a delete marker as `key`'s last message (only meaningful while
        `live`): deleted, as opposed to never written."""
        return key in self._view.deleted

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._main_loop = asyncio.get_running_loop()
        self._monitor = _Monitor(self)
        self._thread = threading.Thread(
            target=self._monitor.run, name=f"users-watch-{self.bucket}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.request_stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None
        self._view = _DARK
        self.state = "stopped"
        self.live_event.clear()

    def disconnected(self) -> None:
        """The service's own connection dropped: stop answering at once (requests cannot reach
        us meanwhile; a reply decided from memory now could only go out after the copy is
        confirmed again or not at all)."""
        self._main_down = True

    def reconnected(self) -> None:
        self._main_down = False

    # -- called from the watch thread ---------------------------------------------------------
    def _publish(self, view: _View) -> None:
        self._view = view
        if self._waiting:
            self._on_main(self._view_changed)

    def _view_changed(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _on_main(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._main_loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us: stopping
                loop.call_soon_threadsafe(callback, *args)

    def _change(self, key: str, old: bytes | None, new: bytes | None) -> None:
        if not self.listeners:
            return
        self._changes.append((key, old, new))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._on_main(self._drain)

    def _drain(self) -> None:
        # Cleared before draining: a change queued meanwhile schedules another drain.
        self._drain_scheduled = False
        while self._changes:
            key, old, new = self._changes.popleft()
            for listener in self.listeners:
                try:
                    listener(key, old, new)
                except Exception as exc:  # a listener's bug must not stop the watch
                    log.error("users_cache_listener_error", exception=type(exc).__name__)

    def _loaded(self, records: Mapping[str, bytes]) -> None:
        for listener in self.load_listeners:
            try:
                listener(records)
            except Exception as exc:
                log.error("users_cache_listener_error", exception=type(exc).__name__)

    def _set_live(self, live: bool) -> None:
        if live:
            self.live_event.set()
        else:
            self.live_event.clear()


@dataclass(frozen=True, slots=True)
class _Probe:
    sent: float  # monotonic time the probe was sent
    last_seq: int


class _Monitor:
    """The watch thread: its event loop, its connection, the watch and the probes."""

    def __init__(self, store: WatchedStore) -> None:
        self.s = store
        self.loop: asyncio.AbstractEventLoop | None = None
        self.nc: Client | None = None
        self.stopping = False
        self.wake: asyncio.Event | None = None
        self.lost: str | None = None
        # The copy being built or followed.
        self.records: dict[str, bytes] = {}
        self.deleted: set[str] = set()
        # Stream sequence at which each key of the copy first appeared, in order.
        self.births: list[int] = []
        self.seen = 0  # stream sequence of the last message applied
        self.cseq = 0  # consumer sequence of the last message delivered
        self.generation = 0  # of the watch consumer; deliveries of older ones are ignored
        self.sub: Any = None
        self.consumer: str | None = None
        self.caught_up: asyncio.Event | None = None
        self.loaded = False
        self.created: str | None = None
        self.allow_direct = False
        self.heard = 0.0  # monotonic time the watch last delivered anything
        self.resuming = False
        # Leader probes answered but not yet covered by the watch, in send order.
        self.pending: list[_Probe] = []
        self.behind_since: float | None = None
        self.until = 0.0
        self.election = False
        self.disconnected = False
        self.replica_last = -1  # the last message a replica probe found (-1: none answered)
        self.catching_up = False
        self.leader_confirmed = 0.0  # send time of the last leader probe that confirmed
        self.leader_answered = 0.0  # when the leader last answered a probe
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_error = ""
        self.last_good: dict[str, bytes] | None = None

    # -- thread entry and stop ----------------------------------------------------------------
    def run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self.main())
        finally:
            loop.close()

    def request_stop(self) -> None:
        self.stopping = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()

    # -- state ---------------------------------------------------------------------------------
    def lose(self, reason: str, state: str = "unavailable") -> None:
        """Stop answering now (before anything else runs on this thread), and reload."""
        self.s._publish(_DARK)
        self.until = 0.0
        self.election = False
        if self.s.state in ("live", "election"):
            log.warning("users_cache_not_live", bucket=self.s.bucket, state=state, detail=reason)
            self.s._on_main(self.s._set_live, False)
        self.s.state = state
        if self.lost is None:
            self.lost = reason
        self._wake()

    def dark(self, reason: str, state: str) -> None:
        """Stop answering now, keeping the copy for when it is confirmed again."""
        self.until = 0.0
        self.election = False
        self.s._publish(_View(self.records, self.deleted, 0.0, False))
        if self.s.state in ("live", "election"):
            log.warning("users_cache_not_live", bucket=self.s.bucket, state=state, detail=reason)
            self.s._on_main(self.s._set_live, False)
        self.s.state = state

    def set_election(self, election: bool) -> None:
        if self.disconnected:
            election = False
        if election != self.election:
            self.election = election
            self.s._publish(_View(self.records, self.deleted, self.until, election))

    def extend(self, until: float, state: str) -> None:
        if self.disconnected:
            return  # an answer read before the drop confirms nothing after it
        if until > self.until:
            self.until = until
            self.s._publish(_View(self.records, self.deleted, until, self.election))
        elif state == "election":
            return  # the leader's confirmation covers longer
        if self.s.state != state:
            if state == "election":
                log.warning("users_cache_election", bucket=self.s.bucket)
            elif self.s.state == "election":
                log.info("users_cache_leader_back", bucket=self.s.bucket)
            elif self.s.state == "disconnected":
                log.info("users_cache_confirmed", bucket=self.s.bucket, was=self.s.state)
            if self.s.state not in ("live", "election"):
                self.s._on_main(self.s._set_live, True)
            self.s.state = state

    # -- the loop ------------------------------------------------------------------------------
    async def main(self) -> None:
        self.wake = asyncio.Event()
        try:
            while not self.stopping:
                try:
                    await self.session()
                except _Lost as exc:
                    self.lose(str(exc))
                except Exception as exc:  # any failure: stop answering, then reload
                    self.lose(f"{type(exc).__name__}: {str(exc)[:200]}")
                finally:
                    await self.cancel_tasks()
                if not self.stopping and self.lost is not None:
                    self.note_error(self.lost)
                if self.stopping:
                    break
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.s._retry_interval):
                        await self.wake.wait()
        finally:
            self.s._publish(_DARK)
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()

    def note_error(self, detail: str) -> None:
        if detail != self.last_error:  # once per distinct failure, not every retry
            log.warning("users_cache_error", bucket=self.s.bucket, detail=detail)
            self.last_error = detail

    async def cancel_tasks(self) -> None:
        tasks, self.tasks = self.tasks, set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self.sub is not None:
            sub, self.sub = self.sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.delete_consumer()

    async def connection(self) -> Client:
        if self.nc is not None and not self.nc.is_closed:
            if not self.nc.is_connected:
                raise _Lost("not connected")
            return self.nc

        async def disconnected() -> None:
            # Dark at once, but the copy is kept: after the reconnect the watch resumes from
            # where it was, and the copy answers again once probes confirm it, or through a
            # leader election (a node dying takes our connection with it) once a replica does.
            self.disconnected = True
            self.dark("watch connection lost", "disconnected")

        async def reconnected() -> None:
            self.disconnected = False
            if self.loaded and not self.resuming:
                self.resume("reconnected")
            self._wake()

        async def error(exc: Exception) -> None:
            log.warning("users_cache_nats_error", exception=type(exc).__name__)

        try:
            self.nc = await self.s._connect(
                {"disconnected_cb": disconnected, "reconnected_cb": reconnected, "error_cb": error}
            )
        except (Exception, SystemExit) as exc:  # the connect helper exits on failure
            raise _Lost(f"cannot connect: {type(exc).__name__}") from None
        await self.nc.subscribe(
            f"$JS.EVENT.ADVISORY.STREAM.*.{self.s._stream}", cb=self.on_stream_advisory
        )
        await self.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.DELETED.{self.s._stream}.*",
            cb=self.on_consumer_deleted,
        )
        return self.nc

    async def session(self) -> None:
        """Load the bucket, then follow it until the copy is lost."""
        nc = await self.connection()
        self.lost = None
        self.wake_clear()
        started = time.monotonic()
        # Fresh state: nothing from a previous copy may confirm this one.
        self.records, self.deleted, self.births = {}, set(), []
        self.seen, self.loaded, self.pending, self.behind_since = 0, False, [], None
        self.until = self.leader_confirmed = 0.0
        self.election = False
        self.replica_last = -1
        self.leader_answered = time.monotonic()
        self.created = None
        before = await self.leader_probe_once(nc)  # raises when there is no bucket
        target = await self.last_message(nc)
        self.caught_up = asyncio.Event()
        await self.create_consumer(nc, start=None)
        # The load is complete once the watch reached the stream's last message as it was
        # before we subscribed (the last of its key, so it comes). Not the consumer's own
        # "nothing pending": a fresh consumer can say so before it has caught up (R3).
        while target and self.seen < target:
            progress = self.seen
            self.caught_up.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(self.s._heartbeat * 4, 1.0)):
                    await self.caught_up.wait()
            self.check_lost()
            if self.seen == progress and self.seen < target:
                raise _Lost("initial load stalled")
        self.loaded = True
        # Changes made while the copy was not loaded (a reconnect, a reload) are found by
        # comparing with the last copy that answered.
        previous, self.last_good = self.last_good, self.records
        if previous is not None:
            for key in previous.keys() | self.records.keys():
                if previous.get(key) != self.records.get(key):
                    self.s._change(key, previous.get(key), self.records.get(key))
        if self.s.load_listeners:
            done = asyncio.get_running_loop().create_future()
            snapshot = dict(self.records)

            def call() -> None:
                try:
                    self.s._loaded(snapshot)
                finally:
                    assert self.loop is not None
                    self.loop.call_soon_threadsafe(done.set_result, None)

            self.s._on_main(call)
            async with asyncio.timeout(30):
                await done
        self.check_lost()
        self.s.loads += 1
        self.s.load_seconds = time.monotonic() - started
        # The watch holds everything acknowledged before `before` was sent.
        self.confirm_from(before)
        self.s._on_main(self.s._set_live, True)
        self.last_error = ""
        log.info(
            "users_cache_live",
            bucket=self.s.bucket,
            users=len(self.records),
            load_ms=round(self.s.load_seconds * 1000, 1),
            allow_direct=self.allow_direct,
        )
        await self.follow(nc)

    def wake_clear(self) -> None:
        assert self.wake is not None
        self.wake.clear()

    def check_lost(self) -> None:
        if self.stopping:
            raise _Lost("stopping")
        if self.lost is not None:
            raise _Lost(self.lost)

    async def follow(self, nc: Client) -> None:
        assert self.wake is not None
        interval = self.s._probe_interval
        # Probes are sent every interval whether or not earlier ones have been answered: one
        # answer held up (a busy server, a busy machine) must not hold up the next.
        leaders: set[asyncio.Task[None]] = set()
        replicas: set[asyncio.Task[None]] = set()
        while True:
            self.check_lost()
            now = time.monotonic()
            if len(leaders) < _MAX_IN_FLIGHT:
                self.spawn(self.leader_probe(nc), leaders)
            silent = now - self.leader_answered > 2 * interval
            if self.allow_direct and silent and len(replicas) < _MAX_IN_FLIGHT:
                self.spawn(self.replica_probe(nc), replicas)
            # Replica reads need a replica holding every write the leader last told us of (a
            # write may have reached it and not the watch: a read then takes the replica's).
            covered = max((p.last_seq for p in self.pending), default=0) <= self.replica_last
            self.set_election(
                self.allow_direct
                and silent
                and covered
                and self.leader_confirmed > 0
                and now - self.leader_confirmed < self.s._election_limit
            )
            if self.pending and self.behind_since is None:
                self.behind_since = now
            elif not self.pending:
                self.behind_since = None
            stale_watch = now - self.heard > 3 * self.s._heartbeat
            stuck = self.behind_since is not None and now - self.behind_since > 1.0
            if (stale_watch or stuck) and not self.resuming:
                self.resume("watch silent" if stale_watch else "watch behind the stream")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.wake.wait()

    def spawn(
        self, coro: Awaitable[None], group: set[asyncio.Task[None]] | None = None
    ) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        for tasks in (self.tasks, group):
            if tasks is not None:
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        return task

    # -- probes --------------------------------------------------------------------------------
    async def request(self, nc: Client, subject: str, payload: bytes) -> Msg | None:
        """None when nothing answered in time, or the connection is down (no evidence either
        way); _Lost when JetStream said it is not there."""
        if not nc.is_connected:
            return None
        try:
            return await nc.request(subject, payload, timeout=self.s._probe_timeout)
        except nats.errors.NoRespondersError:
            raise _Lost("JetStream is not available (no responders)") from None
        except nats.errors.TimeoutError:
            return None

    async def leader_probe_once(self, nc: Client) -> _Probe:
        sent = time.monotonic()
        msg = await self.request(nc, self.s._info_subject, b"")
        if msg is None:
            raise _Lost("stream probe unanswered")
        probe = self.read_info(msg, sent)
        if probe is None:
            raise _Lost("the stream has no leader")
        return probe

    async def last_message(self, nc: Client) -> int:
        """Stream sequence of the bucket's last message (0: none), from the leader."""
        payload = orjson.dumps({"last_by_subj": self.s._subject_prefix + ">"})
        msg = await self.request(nc, f"$JS.API.STREAM.MSG.GET.{self.s._stream}", payload)
        if msg is None:
            raise _Lost("last message unanswered")
        doc = orjson.loads(msg.data)
        error = doc.get("error") if isinstance(doc, dict) else "not an object"
        if isinstance(error, dict) and error.get("err_code") == _NO_MESSAGE:
            return 0
        if error is not None:
            raise _Lost(f"last message: {str(error)[:200]}")
        message = doc.get("message")
        seq = message.get("seq") if isinstance(message, dict) else None
        if not isinstance(seq, int):
            raise _Lost("last message: no sequence")
        return seq

    async def leader_probe(self, nc: Client) -> None:
        sent = time.monotonic()
        try:
            msg = await self.request(nc, self.s._info_subject, b"")
            if msg is None:
                return  # silent: a leader election, or JetStream stalled; the window decides
            probe = self.read_info(msg, sent)
        except _Lost as exc:
            self.lose(str(exc))
            return
        if probe is None:
            return
        self.leader_answered = time.monotonic()
        self.set_election(False)
        bisect.insort(self.pending, probe, key=lambda p: p.sent)
        del self.pending[:-_MAX_PENDING]  # a later probe the watch covers confirms more anyway
        self.confirm()

    def read_info(self, msg: Msg, sent: float) -> _Probe | None:
        """A leader probe's answer; None when it names no leader. Raises _Lost when the answer
        says the copy is gone or wrong."""
        try:
            doc = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            raise _Lost("stream probe: not JSON") from None
        if not isinstance(doc, dict):
            raise _Lost("stream probe: not an object")
        error = doc.get("error")
        if error is not None:
            code = error.get("err_code") if isinstance(error, dict) else None
            if code == _STREAM_NOT_FOUND:
                raise _Lost(f"bucket {self.s.bucket!r} does not exist")
            description = error.get("description", "") if isinstance(error, dict) else error
            raise _Lost(f"stream probe: JetStream error {code}: {str(description)[:200]}")
        cluster = doc.get("cluster")
        if isinstance(cluster, dict) and "leader" not in cluster and cluster.get("replicas"):
            return None
        state = doc.get("state") or {}
        config = doc.get("config") or {}
        created = str(doc.get("created"))
        last_seq = int(state.get("last_seq") or 0)
        if self.created is None:
            self.created = created
        elif created != self.created:
            # (Not `last_seq < seen`: an answer the leader gave just before a write can reach
            # us after the watch delivered that write.)
            raise _Lost("bucket was re-created")
        # A purge sends the watch nothing, but leaves fewer subjects than the keys we knew of
        # when the leader answered (a delete marker is a subject too).
        if self.loaded and int(state.get("num_subjects") or 0) < bisect.bisect_right(
            self.births, last_seq
        ):
            raise _Lost("keys were purged from the bucket")
        allow_direct = bool(config.get("allow_direct"))
        if allow_direct != self.allow_direct:
            self.allow_direct = allow_direct
            if not allow_direct and self.loaded:
                log.warning("users_cache_no_direct", bucket=self.s.bucket)
        return _Probe(sent, last_seq)

    def confirm(self) -> None:
        """Leader probes the watch has caught up with confirm the copy from their send time."""
        if not any(p.last_seq <= self.seen for p in self.pending):
            return
        # Answers may arrive out of order: any probe the watch covers counts.
        covered = max(p.sent for p in self.pending if p.last_seq <= self.seen)
        self.pending = [p for p in self.pending if p.last_seq > self.seen]
        if self.loaded:
            self.confirm_from(_Probe(covered, 0))

    def confirm_from(self, probe: _Probe) -> None:
        self.leader_confirmed = max(self.leader_confirmed, probe.sent)
        self.extend(probe.sent + self.s._window, "live")

    async def replica_probe(self, nc: Client) -> None:
        sent = time.monotonic()
        payload = orjson.dumps({"last_by_subj": self.s._subject_prefix + ">"})
        try:
            msg = await self.request(nc, self.s._direct_subject, payload)
        except _Lost:
            # No replica serving direct gets at this moment (one can drop out for an instant
            # as the leader dies): no evidence, so nothing is extended. A deleted bucket or
            # JetStream off is the leader probe's (and the advisory's) to tell.
            return
        if msg is None:
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            if self.records or self.deleted:
                self.lose("keys were purged from the bucket")
                return
            last = 0
        elif status is not None:
            return  # not an answer about the stream's contents
        else:
            try:
                last = int(headers.get("Nats-Sequence", ""))
            except ValueError:
                return
        self.replica_last = last
        if self.seen < last <= self.seen + _MAX_CATCH_UP and not self.catching_up:
            self.catching_up = True
            self.spawn(self.catch_up(nc, last))
        # The replica holds nothing the copy lacks; the leader has not said the copy is behind,
        # and confirmed it recently enough for this to be the election it looks like.
        if (
            last <= self.seen
            and not self.pending
            and sent - self.leader_answered > 2 * self.s._probe_interval
            and self.leader_confirmed
            and sent - self.leader_confirmed < self.s._election_limit
        ):
            self.extend(sent + self.s._window, "election")

    # -- advisories ----------------------------------------------------------------------------
    async def on_stream_advisory(self, msg: Msg) -> None:
        kind = msg.subject.split(".")[4] if msg.subject.count(".") >= 5 else ""
        if kind == "DELETED":
            self.lose(f"bucket {self.s.bucket!r} was deleted (advisory)")
        elif kind == "LEADER_ELECTED" and self.loaded and not self.resuming:
            if time.monotonic() - self.heard > self.s._heartbeat:
                self.resume("stream leader elected")

    async def on_consumer_deleted(self, msg: Msg) -> None:
        if self.consumer is not None and msg.subject.endswith("." + self.consumer):
            self.consumer = None
            if self.loaded and not self.resuming:
                self.resume("watch consumer deleted")

    # -- the watch -----------------------------------------------------------------------------
    async def create_consumer(self, nc: Client, start: int | None) -> None:
        """An ordered push consumer: the last message per key (start None), or every message
        from stream sequence `start`. Delivered in order, with heartbeats and flow control;
        any gap makes a new one from where the copy is (`resume`)."""
        self.generation += 1
        generation = self.generation
        inbox = nc.new_inbox()

        async def deliver(msg: Msg) -> None:
            if generation == self.generation:
                self.on_delivery(msg)

        sub = await nc.subscribe(inbox, cb=deliver, pending_msgs_limit=-1, pending_bytes_limit=-1)
        config: dict[str, Any] = {
            "deliver_subject": inbox,
            "ack_policy": "none",
            "max_deliver": 1,
            "filter_subject": self.s._subject_prefix + ">",
            "idle_heartbeat": int(self.s._heartbeat * _NS),
            "flow_control": True,
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": 5 * _NS,
            "replay_policy": "instant",
        }
        if start is None:
            config["deliver_policy"] = "last_per_subject"
        else:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = start
        request = orjson.dumps({"stream_name": self.s._stream, "config": config})
        old_sub, self.sub = self.sub, sub
        if old_sub is not None:
            with contextlib.suppress(Exception):
                await old_sub.unsubscribe()
        await self.delete_consumer()
        self.cseq = 0
        self.heard = time.monotonic()
        msg = await self.request(nc, f"$JS.API.CONSUMER.CREATE.{self.s._stream}", request)
        if msg is None:
            raise _Lost("watch consumer not created (no answer)")
        doc = orjson.loads(msg.data)
        if not isinstance(doc, dict) or doc.get("error") is not None:
            error = doc.get("error") if isinstance(doc, dict) else doc
            if isinstance(error, dict) and error.get("err_code") == _STREAM_NOT_FOUND:
                raise _Lost(f"bucket {self.s.bucket!r} does not exist")
            raise _Lost(f"watch consumer not created: {str(error)[:200]}")
        if generation == self.generation:
            self.consumer = str(doc.get("name"))
        if start is None and int(doc.get("num_pending") or 0) == 0 and self.cseq == 0:
            assert self.caught_up is not None
            self.caught_up.set()  # an empty bucket sends nothing to mark the end of the load

    async def delete_consumer(self) -> None:
        name, self.consumer = self.consumer, None
        nc = self.nc
        if name is None or nc is None or not nc.is_connected:
            return
        # Best effort, not awaited: the consumer also goes by itself once inactive.
        with contextlib.suppress(Exception):
            await nc.publish(f"$JS.API.CONSUMER.DELETE.{self.s._stream}.{name}", b"")

    def resume(self, why: str) -> None:
        """A new watch consumer from the copy's next sequence: the copy keeps answering only as
        long as probes confirm it, so nothing is trusted across the gap."""
        if self.nc is None or self.resuming:
            return
        self.resuming = True
        log.info("users_cache_watch_resume", bucket=self.s.bucket, detail=why, seq=self.seen)
        self.spawn(self._resume(self.nc))

    async def _resume(self, nc: Client) -> None:
        try:
            while not self.stopping and self.lost is None:
                try:
                    await self.create_consumer(nc, start=self.seen + 1)
                    return
                except _Lost as exc:
                    if "does not exist" in str(exc):
                        self.lose(str(exc))
                        return
                await asyncio.sleep(self.s._retry_interval)
        finally:
            self.resuming = False

    def on_delivery(self, msg: Msg) -> None:
        self.heard = time.monotonic()
        headers = msg.headers
        if headers and "Status" in headers:
            status = headers.get("Status")
            if status == "100":
                if msg.reply:  # flow control request
                    self.spawn(self.reply(msg.reply))
                stalled = headers.get("Nats-Consumer-Stalled")
                if stalled:
                    self.spawn(self.reply(stalled))
                last = headers.get("Nats-Last-Consumer")
                if last is not None and last != str(self.cseq) and self.loaded:
                    self.resume("watch missed a message")
            else:
                self.resume(f"watch status {status}")
            return
        try:
            meta = msg.metadata
        except Exception:
            return
        if meta.sequence.consumer != self.cseq + 1:
            self.resume("watch missed a message")
            return
        self.cseq = meta.sequence.consumer
        self.apply(meta.sequence.stream, msg.subject, headers, msg.data)
        if meta.num_pending == 0 and self.caught_up is not None:
            self.caught_up.set()
        elif self.caught_up is not None and not self.loaded:
            self.caught_up.set()  # progress during the load

    def apply(self, sseq: int, subject: str, headers: dict[str, str] | None, data: bytes) -> None:
        """One stream message, in stream order; one the copy already has is skipped."""
        if sseq <= self.seen:
            return
        key = subject[len(self.s._subject_prefix) :]
        old = self.records.get(key)
        if old is None and key not in self.deleted:
            self.births.append(sseq)
        new: bytes | None
        if is_delete(headers):
            self.records.pop(key, None)
            self.deleted.add(key)
            new = None
        else:
            self.records[key] = new = data
            self.deleted.discard(key)
        self.seen = sseq
        if self.loaded:
            if old != new:
                self.s._change(key, old, new)
            self.confirm()

    async def catch_up(self, nc: Client, last: int) -> None:
        """Take the messages the copy lacks up to `last` from a replica, one direct get each:
        while the stream elects a leader the watch cannot resume, and a write the watch missed
        (it was on its way when the leader died) would otherwise keep the copy from answering
        until the new leader. A message a replica holds is committed: the same the watch would
        have delivered."""
        try:
            while self.seen < last:
                seq = self.seen + 1
                payload = orjson.dumps({"seq": seq})
                msg = await self.request(nc, self.s._direct_subject, payload)
                if msg is None:
                    return
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404":
                    self.seen = max(self.seen, seq)  # gone (superseded): nothing to apply
                    self.confirm()
                    continue
                subject = headers.get("Nats-Subject", "")
                if status is not None or not subject.startswith(self.s._subject_prefix):
                    return
                self.apply(seq, subject, headers, msg.data)
        except _Lost:
            return
        finally:
            self.catching_up = False

    async def reply(self, subject: str) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(subject, b"")
