"""The users store goes away under a running service, then comes back: the bucket deleted and
re-created, JetStream switched off for the callout account and on again (a config reload).

Throughout, a known, a revoked and fresh unknown users connect in loops (`Probes`). While the
store is gone the known user must be denied at once with `store_unavailable` (after at most
the users cache's staleness bound of two probe intervals, during which the cache may still
admit it: it was allowed a moment ago); nobody else is ever admitted; when the store is back,
the known user is admitted again without touching the service.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support.nats import Keys, NatsServer, ServerFactory, new_user
from tests.support.rig import rig
from tests.support.service import record, users_bucket
from tests.support.wait import eventually
from tests.support.witness import Probes, Tally, tried

#: How long the service may take to admit the known user once the store is back.
RECOVER_WITHIN = 10.0


async def test_users_bucket_deleted_then_recreated(
    server: NatsServer, keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    forgotten_seed, forgotten = new_user()  # in the old bucket only
    async with rig(server, keys, tmp_path, serve=None) as r:
        kv = await users_bucket(r.admin)
        await kv.put(forgotten, record("forgotten", admin=True))
        svc = await r.serve()
        await svc.await_event("users_cache_live", users=3)
        assert (await tried(tally, r.witness, server.url, forgotten_seed, "known")).admitted

        probes = Probes(r.witness, server.url, tally, r.users).start()
        try:
            await eventually(lambda: probes.streak("known", 0.0) >= 2)
            deleted = time.monotonic()
            assert await r.admin.jetstream().delete_key_value("users")
            await svc.await_event("users_cache_not_live")
            await eventually(lambda: probes.denied_with("known", "store_unavailable", deleted))
            await eventually(
                lambda: all(len(probes.since(deleted, role)) >= 3 for role in probes.roles)
            )
            # The cache has let go of the old bucket: its users are gone with it.
            outcome = await tried(tally, r.witness, server.url, forgotten_seed, "forgotten")
            assert outcome.reason == "store_unavailable"

            recreated = time.monotonic()
            await r.put_users()  # a new bucket, without `forgotten`
            await eventually(lambda: probes.streak("known", recreated) >= 3, RECOVER_WITHIN)
            tally.notes["admitted again after (s)"] = round(time.monotonic() - recreated, 2)
        finally:
            await probes.stop()
        await svc.await_event("users_cache_live", users=2)
        for _ in range(3):
            outcome = await tried(tally, r.witness, server.url, forgotten_seed, "forgotten")
            assert outcome.reason == "unknown_user"

        assert svc.proc.poll() is None
        # (`unknown_user` between the new bucket's creation and the revoked user's record)
        assert set(tally.reasons("revoked")) <= {"revoked", "store_unavailable", "unknown_user"}
        assert set(tally.reasons("unknown")) <= {"unknown_user", "store_unavailable"}
        tally.check()


async def test_jetstream_disabled_for_the_account_then_enabled(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    """nats-server 2.15.1 reloads an account's `jetstream` setting: removing it makes every
    JetStream API call of the account answer 10039 "JetStream not enabled for account", and
    restoring it restores the streams from disk (no restart needed, so none is done).
    (`tests/e2e/test_store_down.py` covers a server started without JetStream.)"""
    server = nats_server()
    enabled = server.config
    disabled = enabled.replace("\n    jetstream: enabled", "", 1)
    assert disabled != enabled
    async with rig(server, keys, tmp_path) as r:
        assert r.svc is not None
        probes = Probes(r.witness, server.url, tally, r.users).start()
        try:
            await eventually(lambda: probes.streak("known", 0.0) >= 2)
            off = time.monotonic()
            await asyncio.to_thread(server.reload, disabled)
            await eventually(lambda: probes.denied_with("known", "store_unavailable", off))
            # Every role tried a few times while JetStream is off.
            await eventually(
                lambda: all(len(probes.since(off, role)) >= 3 for role in probes.roles)
            )
            on = time.monotonic()
            await asyncio.to_thread(server.reload, enabled)
            await eventually(lambda: probes.streak("known", on) >= 3, RECOVER_WITHIN)
            tally.notes["admitted again after (s)"] = round(time.monotonic() - on, 2)
        finally:
            await probes.stop()
        assert r.svc.proc.poll() is None
        # A reload makes nats-server re-authorize clients that are still connecting: one that
        # has not sent its CONNECT yet is called out with empty connect_opts (denied
        # `no_nkey`), one already called out is called out again with the same client nonce
        # (denied `replay` by the nonce rule). Denies either way, and answered.
        also = {"store_unavailable", "no_nkey", "replay"}
        tally.notes["denied no_nkey / replay by the reload's re-authorization"] = sum(
            1 for o in tally.outcomes if o.reason in ("no_nkey", "replay")
        )
        assert set(tally.reasons("revoked")) <= {"revoked", *also}
        assert set(tally.reasons("unknown")) <= {"unknown_user", *also}
        tally.check()
