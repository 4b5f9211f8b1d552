"""The watched users cache against a real nats-server: it answers only while provably current,
and falls back to direct lookups (never to stale data) otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from callout.store import TOMBSTONE, StoreError, WouldBlock
from callout.store.kv import KVStore
from callout.store.watch import WatchedStore
from tests.support.nats import Keys, nats_connect, new_user
from tests.support.service import record, users_bucket, watch_connection
from tests.support.wait import eventually

# The cache reaches its states on its own thread (no event is exposed): polled finely, so the
# seconds `eventually` returns measure the cache, not the poll.
cache_reaches = functools.partial(eventually, timeout=5.0, interval=0.002)


class CountingStore(KVStore):
    calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        return await super().get(key)


async def watched(
    nc: Any, keys: Keys, *, start: bool = True, **kw: Any
) -> tuple[WatchedStore, CountingStore]:
    direct = CountingStore(nc, "users")
    kw.setdefault("retry_interval", 0.1)
    store = WatchedStore(
        nc, "users", connect=watch_connection(nc, keys.service_seed), direct=direct, **kw
    )
    if start:
        store.start()
    return store, direct


async def silent(*_: Any) -> None:
    """A probe's request that gets no answer: a stalled JetStream, as the probes see it."""
    return None


@contextlib.asynccontextmanager
async def live_copy(
    nats_server: Any, keys: Keys, records: Mapping[str, bytes]
) -> AsyncIterator[tuple[Any, WatchedStore, CountingStore]]:
    """A server whose users bucket holds `records`, and a cache of it that has gone live: the
    bucket, the cache and its direct store; the cache stopped and the connection closed after."""
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    for key, value in records.items():
        await kv.put(key, value)
    store, direct = await watched(nc, keys)
    try:
        await asyncio.wait_for(store.live_event.wait(), 5)
        yield kv, store, direct
    finally:
        await store.stop()
        await nc.close()


async def test_live_cache_answers_without_round_trips(nats_server: Any, keys: Keys) -> None:
    _, alice = new_user()
    async with live_copy(nats_server, keys, {alice: record("alice")}) as (_, store, direct):
        assert store.size == 1
        assert await store.get(alice) == record("alice")
        _, stranger = new_user()
        assert await store.get(stranger) is None
        assert direct.calls == 0


async def test_revocation_reaches_every_replica_within_100ms(nats_server: Any, keys: Keys) -> None:
    server = nats_server()
    admin = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(admin)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    replicas = []
    for _ in range(2):
        nc = await nats_connect(server.url, keys.service_seed)
        replicas.append((nc, *(await watched(nc, keys))))
    try:
        for _, store, _ in replicas:
            await cache_reaches(lambda s=store: s.live)  # type: ignore[misc]
        revoked = record("alice", revoked=True)
        await kv.put(alice, revoked)
        written = time.monotonic()
        for _, store, _ in replicas:
            await cache_reaches(lambda s=store: s._view.records.get(alice) == revoked, timeout=2)  # type: ignore[misc]
            assert time.monotonic() - written < 0.1
            assert await store.get(alice) == revoked
        await kv.delete(alice)
        for _, store, _ in replicas:
            await cache_reaches(lambda s=store: alice not in s._view.records, timeout=2)  # type: ignore[misc]
            assert await store.get(alice) is TOMBSTONE
    finally:
        for nc, store, _ in replicas:
            await store.stop()
            await nc.close()
        await admin.close()


async def test_deleted_bucket_is_never_served_from_memory(nats_server: Any, keys: Keys) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, _ = await watched(nc, keys)
    try:
        await cache_reaches(lambda: store.live)
        await nc.jetstream().delete_key_value("users")
        await cache_reaches(lambda: not store.live)
        with pytest.raises(StoreError):
            await store.get(alice)
        # Re-created with different contents: the old record must not come back.
        kv = await users_bucket(nc)
        _, bob = new_user()
        await kv.put(bob, record("bob"))
        await cache_reaches(lambda: store.live)
        assert await store.get(alice) is None
        assert await store.get(bob) == record("bob")
    finally:
        await store.stop()
        await nc.close()


async def test_quick_delete_and_recreate_is_detected(nats_server: Any, keys: Keys) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    js = nc.jetstream()
    kv = await users_bucket(nc)
    users = [new_user()[1] for _ in range(3)]
    for pub in users:
        await kv.put(pub, record("x"))
    store, _ = await watched(nc, keys)
    try:
        await cache_reaches(lambda: store.live)
        loads = store.loads
        await js.delete_key_value("users")
        kv = await users_bucket(nc)  # back before the next probe, most likely
        await kv.put(users[0], record("only-one"))
        await cache_reaches(lambda: store.loads > loads and store.live)
        assert await store.get(users[0]) == record("only-one")
        assert await store.get(users[1]) is None
    finally:
        await store.stop()
        await nc.close()


async def test_stream_purge_drops_the_copy(nats_server: Any, keys: Keys) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, _ = await watched(nc, keys)
    try:
        await cache_reaches(lambda: store.live)
        loads = store.loads
        await nc.jetstream().purge_stream("KV_users")  # no message reaches the watch
        await cache_reaches(lambda: store.loads > loads and store.live)
        assert await store.get(alice) is None
    finally:
        await store.stop()
        await nc.close()


async def test_disconnect_stops_answering_and_reconnect_reloads(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    stores: list[WatchedStore] = []

    async def on_disconnected() -> None:
        for s in stores:
            s.disconnected()

    async def on_reconnected() -> None:
        for s in stores:
            s.reconnected()

    nc = await nats_connect(
        server.url,
        keys.service_seed,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, _ = await watched(nc, keys)
    stores.append(store)
    try:
        await cache_reaches(lambda: store.live)
        server.stop()
        await cache_reaches(lambda: not store.live)
        assert store.state in {"disconnected", "unavailable"}
        with pytest.raises(StoreError):
            await store.get(alice)  # no server: the direct lookup fails, the copy is gone
        server.start()
        await cache_reaches(lambda: store.live, timeout=15)
        assert await store.get(alice) == record("alice")
    finally:
        await store.stop()
        await nc.close()


async def test_a_deleted_key_is_a_tombstone_and_a_key_never_written_is_none(
    nats_server: Any, keys: Keys
) -> None:
    """Soft mode admits a key that never had a record, never one that was deleted: both the
    copy and the direct lookup must tell them apart."""
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    (_, alice), (_, bob), (_, stranger) = new_user(), new_user(), new_user()
    await kv.put(alice, record("alice"))
    await kv.put(bob, record("bob"))
    await kv.delete(alice)
    await kv.purge(bob)
    direct = KVStore(nc, "users")
    store, _ = await watched(nc, keys)
    try:
        await cache_reaches(lambda: store.live)
        for lookup in (store, direct):
            assert await lookup.get(alice) is TOMBSTONE
            assert await lookup.get(bob) is TOMBSTONE
            assert await lookup.get(stranger) is None
        assert await direct.get_entry(alice) is None  # `users get` still says "not found"
    finally:
        await store.stop()
        await nc.close()


async def test_load_listeners_get_every_whole_copy_a_reload_included(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    (_, alice), (_, bob) = new_user(), new_user()
    await kv.put(alice, record("alice"))
    await kv.put(bob, record("bob"))
    await kv.delete(bob)
    store, _ = await watched(nc, keys, start=False)
    copies: list[tuple[dict[str, bytes], bool]] = []
    store.load_listeners.append(lambda copy: copies.append((dict(copy), store.live)))
    store.start()
    try:
        await cache_reaches(lambda: store.live)
        # The first load too, and before the copy answered (live still False).
        assert copies == [({alice: record("alice")}, False)]
        # The bucket goes and comes back with alice revoked: the reload is a whole copy too.
        await nc.jetstream().delete_key_value("users")
        kv = await users_bucket(nc)
        await kv.put(alice, record("alice", revoked=True))
        await cache_reaches(lambda: len(copies) == 2 and store.live)
        assert copies[1] == ({alice: record("alice", revoked=True)}, False)
    finally:
        await store.stop()
        await nc.close()


async def test_large_bucket_loads_completely(nats_server: Any, keys: Keys) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    pubs = [new_user()[1] for _ in range(2000)]
    await asyncio.gather(*(kv.put(p, record(p[:8])) for p in pubs))
    store, direct = await watched(nc, keys)
    try:
        await cache_reaches(lambda: store.live, timeout=30)
        assert store.size == len(pubs)
        assert all([await store.get(p) == record(p[:8]) for p in pubs[:50]])
        assert direct.calls == 0
    finally:
        await store.stop()
        await nc.close()


async def test_a_silent_jetstream_stops_the_copy_within_the_window(
    nats_server: Any, keys: Keys
) -> None:
    _, alice = new_user()
    async with live_copy(nats_server, keys, {alice: record("alice")}) as (_, store, direct):
        monitor = store._monitor
        assert monitor is not None
        real_request = monitor.request

        monitor.request = silent  # type: ignore[method-assign]
        silenced = time.monotonic()
        took = await cache_reaches(lambda: not store.live, timeout=5)
        # The contract's bound: a confirmation answers for 80 ms after its probe was sent.
        assert took < 0.1, f"answered from memory {took * 1000:.0f} ms after the store went silent"
        with pytest.raises(WouldBlock):
            store.get_nowait(alice)
        assert await store.get(alice) == record("alice") and direct.calls == 1
        monitor.request = real_request  # type: ignore[method-assign]
        await cache_reaches(lambda: store.live, timeout=5)
        assert store.get_nowait(alice) == record("alice")
        assert time.monotonic() - silenced < 5


async def test_probes_answered_late_still_answer_lookups_from_the_copy(
    nats_server: Any, keys: Keys
) -> None:
    """A saturated server answers every probe after its window: a lookup waits for the
    confirmation that covers it instead of going to the bucket, sees every write acknowledged
    before it was asked, and goes to the bucket once the leader stops answering at all."""
    _, alice = new_user()
    _, bob = new_user()
    async with live_copy(nats_server, keys, {alice: record("alice")}) as (kv, store, direct):
        monitor = store._monitor
        assert monitor is not None
        real_request = monitor.request

        async def late(*args: Any) -> Any:
            answer = await real_request(*args)
            await asyncio.sleep(0.15)  # the answer reaches us 150 ms later: after its window
            return answer

        monitor.request = late  # type: ignore[method-assign]
        await cache_reaches(lambda: not store.live)
        with pytest.raises(WouldBlock):
            store.get_nowait(alice)
        await kv.put(bob, record("bob"))
        await kv.delete(alice)  # acknowledged before the lookups are asked
        assert await store.get(bob) == record("bob")
        assert await store.get(alice) == TOMBSTONE
        assert direct.calls == 0 and store.state == "live"

        monitor.request = silent  # type: ignore[method-assign]
        # The late answers already on their way still confirm; then the leader is silent.
        await cache_reaches(lambda: time.monotonic() - monitor.leader_answered > 0.2)
        answered = monitor.leader_answered
        assert await store.get(bob) == record("bob") and direct.calls == 1
        # It waited for the leader's silence to outlast a probe's timeout (0.5 s), no longer.
        assert time.monotonic() - answered > 0.5


def spin(seconds: float, each: Callable[[], None]) -> None:
    """Hold the event loop (and the GIL, between switches) like a connect storm does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        each()


async def test_a_busy_event_loop_does_not_stop_the_copy_answering(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, _ = await watched(nc, keys)
    try:
        await asyncio.wait_for(store.live_event.wait(), 5)
        answers: list[bytes | None] = []
        blocked = 0

        def ask() -> None:
            nonlocal blocked
            try:
                answers.append(store.get_nowait(alice))
            except WouldBlock:
                blocked += 1

        spin(1.0, ask)  # twelve windows long: only the watch thread keeps the copy confirmed
        assert blocked == 0 and len(answers) > 1000
        assert set(answers) == {record("alice")}
    finally:
        await store.stop()
        await nc.close()


async def test_a_busy_event_loop_does_not_stretch_the_fail_closed_bound(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, _ = await watched(nc, keys)
    deleted_at: list[float] = []

    def delete_soon() -> None:
        # Another thread, another loop, another connection: the service's loop is busy.
        async def run() -> None:
            admin = await nats_connect(server.url, keys.service_seed)
            await asyncio.sleep(0.3)
            await admin.jetstream().delete_key_value("users")
            deleted_at.append(time.monotonic())
            await admin.close()

        asyncio.run(run())

    try:
        await asyncio.wait_for(store.live_event.wait(), 5)
        last_answer = 0.0

        def ask() -> None:
            nonlocal last_answer
            with contextlib.suppress(WouldBlock):
                store.get_nowait(alice)
                last_answer = time.monotonic()

        deleter = threading.Thread(target=delete_soon)
        deleter.start()
        spin(1.0, ask)
        deleter.join()
        assert deleted_at and last_answer
        window = last_answer - deleted_at[0]
        assert window < 0.1, f"answered from memory {window * 1000:.0f} ms after the delete"
    finally:
        await store.stop()
        await nc.close()


async def test_get_nowait_answers_exactly_when_get_answers_from_memory(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, direct = await watched(nc, keys)
    try:
        with pytest.raises(WouldBlock):
            store.get_nowait(alice)  # still loading
        await asyncio.wait_for(store.live_event.wait(), 5)
        assert store.get_nowait(alice) == await store.get(alice) == record("alice")
        assert store.get_nowait(new_user()[1]) is None
        assert direct.calls == 0
        await kv.delete(alice)
        await cache_reaches(lambda: store.get_nowait(alice) is TOMBSTONE)
        assert store.deleted(alice) and not store.deleted(new_user()[1])
        store.disconnected()  # the service's own connection dropped
        with pytest.raises(WouldBlock):
            store.get_nowait(alice)
        store.reconnected()
        assert store.get_nowait(alice) is TOMBSTONE
    finally:
        await store.stop()
        await nc.close()


async def test_load_listeners_see_the_whole_copy_before_it_answers(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    direct = CountingStore(nc, "users")
    store = WatchedStore(
        nc, "users", connect=watch_connection(nc, keys.service_seed), direct=direct
    )
    seen: list[tuple[dict[str, bytes], bool]] = []
    store.load_listeners.append(lambda copy: seen.append((dict(copy), store.live)))
    changes: list[tuple[str, bytes | None, bytes | None]] = []
    store.listeners.append(lambda *change: changes.append(change))
    store.start()
    try:
        await asyncio.wait_for(store.live_event.wait(), 5)
        assert seen == [({alice: record("alice")}, False)]
        await kv.put(alice, record("alice", revoked=True))
        await cache_reaches(lambda: len(changes) == 1)
        assert changes == [(alice, record("alice"), record("alice", revoked=True))]
    finally:
        await store.stop()
        await nc.close()


async def test_a_deleted_watch_consumer_resumes_without_losing_a_write(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    await kv.put(alice, record("alice"))
    store, _ = await watched(nc, keys)
    try:
        await asyncio.wait_for(store.live_event.wait(), 5)
        monitor = store._monitor
        assert monitor is not None and monitor.consumer is not None
        loads, consumer = store.loads, monitor.consumer
        await nc.jetstream().delete_consumer("KV_users", consumer)
        revoked = record("alice", revoked=True)
        await kv.put(alice, revoked)  # made while the watch may be gone
        written = time.monotonic()
        answers: list[bytes | None] = []
        while time.monotonic() - written < 0.5:
            with contextlib.suppress(WouldBlock):
                answers.append(store.get_nowait(alice))
                if time.monotonic() - written > 0.1:
                    assert answers[-1] == revoked  # never the old record past the bound
            await asyncio.sleep(0.001)
        await cache_reaches(lambda: monitor.consumer not in (None, consumer))
        await cache_reaches(lambda: store.live)
        assert store.get_nowait(alice) == revoked
        assert store.loads == loads  # resumed from where the copy was, not reloaded
    finally:
        await store.stop()
        await nc.close()


async def test_subject_purge_beside_a_deleted_key_drops_the_copy(
    nats_server: Any, keys: Keys
) -> None:
    # The stream counts a deleted key's marker as a subject: purging one live key's subject
    # must still be noticed when another key is deleted.
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    pubs = [new_user()[1] for _ in range(3)]
    for pub in pubs:
        await kv.put(pub, record("x"))
    await kv.delete(pubs[2])
    store, _ = await watched(nc, keys)
    try:
        await asyncio.wait_for(store.live_event.wait(), 5)
        loads = store.loads
        await nc.jetstream().purge_stream("KV_users", subject=f"$KV.users.{pubs[0]}")
        await cache_reaches(lambda: store.loads > loads and store.live)
        assert await store.get(pubs[0]) is None
        assert await store.get(pubs[1]) == record("x")
    finally:
        await store.stop()
        await nc.close()


def test_direct_lookups_read_deletes_as_the_watch_does() -> None:
    import base64

    from callout.store.kv import _deleted

    def block(*lines: str) -> str:
        return base64.b64encode("\r\n".join(["NATS/1.0", *lines, "", ""]).encode()).decode()

    assert _deleted(block("KV-Operation: DEL"))
    assert _deleted(block("KV-Operation: PURGE"))
    assert _deleted(block("Nats-Marker-Reason: MaxAge"))
    assert not _deleted(block("KV-Operation: PUT-ISH"))
    assert not _deleted(block("Other: value"))
    assert not _deleted(None)
