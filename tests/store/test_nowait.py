"""`Store.get_nowait`: every store answers at once exactly when `get` would answer without I/O,
and otherwise raises WouldBlock (never a guess, never "no record")."""

from __future__ import annotations

import asyncio

import pytest

from callout.store import StoreError, WouldBlock
from callout.store.kv import KVStore
from callout.store.memory import MemoryStore
from callout.store.watch import WatchedStore
from tests.support.nats import Keys, NatsServer, nats_connect, new_user
from tests.support.service import record, users_bucket, watch_connection


async def test_memory_store_blocks_only_while_delayed() -> None:
    store = MemoryStore(records={"alice": b"{}"})
    assert store.get_nowait("alice") == b"{}" and store.get_nowait("bob") is None
    assert store.lookups == 2
    store.delay = 0.01
    with pytest.raises(WouldBlock):
        store.get_nowait("alice")
    assert store.lookups == 2  # not a lookup: the awaited one is
    assert await store.get("alice") == b"{}"
    store.delay, store.error = 0.0, "down"
    with pytest.raises(WouldBlock):  # the failure is the awaited get's to report
        store.get_nowait("alice")
    with pytest.raises(StoreError, match="down"):
        await store.get("alice")


async def test_kv_store_always_blocks(server: NatsServer, keys: Keys) -> None:
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        kv = await users_bucket(nc)
        _, alice = new_user()
        await kv.put(alice, record("alice"))
        store = KVStore(nc, "users")
        with pytest.raises(WouldBlock):
            store.get_nowait(alice)
        assert await store.get(alice) == record("alice")
    finally:
        await nc.close()


async def test_watched_store_answers_when_its_copy_may(server: NatsServer, keys: Keys) -> None:
    nc = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    _, stranger = new_user()
    await kv.put(alice, record("alice"))
    store = WatchedStore(
        nc,
        "users",
        connect=watch_connection(nc, keys.service_seed),
        probe_interval=0.05,
        retry_interval=0.1,
    )
    try:
        with pytest.raises(WouldBlock):  # not loaded yet: only a direct lookup can answer
            store.get_nowait(alice)
        store.start()
        await asyncio.wait_for(store.live_event.wait(), 5)
        assert store.get_nowait(alice) == record("alice")
        assert store.get_nowait(stranger) is None  # the whole bucket is known: no record
        store.disconnected()
        with pytest.raises(WouldBlock):
            store.get_nowait(alice)
    finally:
        await store.stop()
        await nc.close()
