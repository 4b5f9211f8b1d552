"""Live sessions follow their record against a real nats-server: a change that would no
longer admit a connection with the access it was given (narrowed permissions, admin removed,
moved to another account, `revoked` made invalid) closes it; an equal or wider one leaves it
be. The ledger is reconciled against every whole copy the watch loads, the first included,
and soft-mode admits are in it too."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats

from callout.decision import Authorizer
from callout.revocation import Revoker
from callout.service import CalloutService
from callout.store.kv import KVStore
from callout.store.watch import WatchedStore
from tests.support.nats import Keys, closed, nats_connect, new_user, raw_connect
from tests.support.service import (
    policy_for,
    record,
    serve_args,
    spawn,
    users_bucket,
    watch_connection,
)


async def test_narrowing_a_record_closes_its_sessions_and_widening_does_not(
    revocation_setup: Any, keys: Keys
) -> None:
    server, files = revocation_setup
    admin = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(admin)
    users = {name: new_user() for name in ("alice", "bob", "carol", "dave", "erin", "frank")}
    before = {
        "alice": record("alice"),  # unrestricted -> restricted
        "bob": record("bob", admin=True, pub_allow=["x"]),  # admin removed
        "carol": record("carol"),  # moved to an account not allowed
        "dave": record("dave"),  # revoked set to an invalid value
        "erin": record("erin", pub_allow=["orders.>"]),  # widened
        "frank": record("frank", pub_allow=["orders.>"]),  # renamed
    }
    after = {
        "alice": record("alice", pub_allow=["orders.>"]),
        "bob": record("bob", pub_allow=["x"]),
        "carol": record("carol", account="SYS"),
        "dave": b'{"name": "dave", "revoked": "yes"}',
        "erin": record("erin", pub_allow=["orders.>", "billing.>"]),
        "frank": record("franklin", pub_allow=["orders.>"]),
    }
    for name, (_, pub) in users.items():
        await kv.put(pub, before[name])
    service = spawn(serve_args(server, files, "--system-nkey-seed-file", str(files["system"])))
    try:
        await service.await_event("users_cache_live")
        conns = {}
        for name, (seed, _) in users.items():
            conns[name] = await raw_connect(server.url, seed, keep_open=True)
            assert conns[name].admitted, (name, conns[name].error)
        # The changes that keep sessions first: the watch delivers in order, so by the time the
        # narrowing ones have closed their connections, these were decided on.
        for name in ("erin", "frank", "alice", "bob", "carol", "dave"):
            await kv.put(users[name][1], after[name])
        for name in ("alice", "bob", "carol", "dave"):
            conn = conns[name].conn
            assert conn is not None
            await closed(conn)
            await service.await_event("revoked_sessions", client=users[name][1])
        for name in ("erin", "frank"):
            conn = conns[name].conn
            assert conn is not None and await conn.ping() is None
        kicked = {e["client"] for e in service.events("revoked_sessions")}
        assert kicked == {users[n][1] for n in ("alice", "bob", "carol", "dave")}
        # The reconnect is decided on the new record.
        assert (await raw_connect(server.url, users["alice"][0])).admitted
        assert not (await raw_connect(server.url, users["carol"][0])).admitted
    finally:
        service.terminate()
        await admin.close()


async def test_the_first_load_kicks_what_was_revoked_before_the_cache_went_live(
    revocation_setup: Any, keys: Keys
) -> None:
    """A connection admitted from a direct lookup before the cache went live, whose record is
    revoked before the load finishes: the first load notifies the revocation too, so the
    session does not last until its JWT expires."""
    server, files = revocation_setup
    system_seed = (await asyncio.to_thread(Path(files["system"]).read_text)).strip()
    admin = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(admin)
    alice_seed, alice = new_user()
    await kv.put(alice, record("alice"))
    nc = await nats.connect(server.url, nkeys_seed_str=keys.service_seed)
    system = await nats.connect(server.url, nkeys_seed_str=system_seed)
    policy = policy_for(keys)
    revoker = Revoker(system, policy.user_ttl, policy)
    watched = WatchedStore(
        nc,
        "users",
        connect=watch_connection(nc, keys.service_seed),
        direct=KVStore(nc, "users"),
    )
    watched.listeners.append(revoker.record_changed)
    watched.load_listeners.append(revoker.loaded)
    service = CalloutService(nc, Authorizer(policy), watched)
    service.observers.append(revoker.observe)
    await service.start()
    try:
        conn = await raw_connect(server.url, alice_seed, keep_open=True)
        assert conn.admitted and conn.conn is not None  # from a direct lookup: not live yet
        assert not watched.live
        await kv.put(alice, record("alice", revoked=True))
        watched.start()
        await closed(conn.conn)
        await revoker.stop()
        assert revoker.kicked == 1
        assert not (await raw_connect(server.url, alice_seed)).admitted
    finally:
        await service.stop()
        await watched.stop()
        await revoker.stop()
        await system.close()
        await nc.close()
        await admin.close()


async def test_soft_mode_admits_are_kicked_like_any_other(
    revocation_setup: Any, keys: Keys
) -> None:
    server, files = revocation_setup
    admin = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(admin)
    (newcomer_seed, newcomer), (leaver_seed, leaver) = new_user(), new_user()
    await kv.put(leaver, record("leaver", pub_allow=["x"]))
    service = spawn(
        serve_args(server, files, "--mode", "soft", "--system-nkey-seed-file", str(files["system"]))
    )
    try:
        await service.await_event("users_cache_live")
        soft = await raw_connect(server.url, newcomer_seed, keep_open=True)  # no record
        known = await raw_connect(server.url, leaver_seed, keep_open=True)
        assert soft.admitted and known.admitted and soft.conn and known.conn
        # A record narrower than the (unrestricted) defaults appears: the soft admit ends.
        await kv.put(newcomer, record("newcomer", pub_allow=["orders.>"]))
        # A record is deleted: soft mode now denies the key, so its session ends too.
        await kv.delete(leaver)
        await closed(soft.conn)
        await closed(known.conn)
        await service.await_event("revoked_sessions", client=newcomer)
        await service.await_event("revoked_sessions", client=leaver)
        denied = await raw_connect(server.url, leaver_seed)
        assert not denied.admitted
        await asyncio.sleep(0)
    finally:
        service.terminate()
        await admin.close()
