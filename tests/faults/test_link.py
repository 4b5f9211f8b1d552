"""The link between the service and nats-server misbehaves (`FaultProxy` in between; clients
connect to the server directly):

- the store is slowed past `--backend-timeout`, or its messages are lost: auth requests and
  replies still flow, so every deny must come from the service, `store_timeout`, within
  `--backend-timeout` + 100 ms, never from the server's timeout;
- the connection is half-closed, toward the service or toward the server: the service notices,
  reconnects and subscribes again by itself. While it is reconnecting nobody is subscribed, so
  the server times those clients out (it has no fast path for "no responders", docs/protocol.md §3):
  those attempts are counted as made while the service was down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from tests.support.nats import Keys, NatsServer, ServerFactory, new_user
from tests.support.proxy import FaultProxy
from tests.support.rig import rig
from tests.support.service import record, users_bucket
from tests.support.wait import eventually
from tests.support.witness import BACKEND_TIMEOUT, CACHE_STALENESS, Probes, Tally, tried

RECOVER_WITHIN = 10.0
#: Past --backend-timeout and the users cache's window (80 ms), so the cache stops answering
#: and lookups go to the (slow) bucket.
SLOW = 1.2


@pytest.fixture
async def proxy(nats_server: ServerFactory) -> AsyncIterator[tuple[NatsServer, FaultProxy]]:
    server = nats_server()
    async with FaultProxy(server.port) as p:
        yield server, p


@pytest.mark.parametrize("fault", ["slow", "lost"])
async def test_store_slow_or_lost(
    proxy: tuple[NatsServer, FaultProxy],
    keys: Keys,
    tmp_path: Path,
    tally: Tally,
    fault: Literal["slow", "lost"],
) -> None:
    server, p = proxy
    async with rig(server, keys, tmp_path, url=p.url) as r:
        assert r.svc is not None
        probes = Probes(r.witness, server.url, tally, r.users).start()
        try:
            await eventually(lambda: probes.streak("known", 0.0) >= 2)
            start = time.monotonic()
            if fault == "slow":
                p.delay(SLOW)
            else:
                p.drop()
            await eventually(lambda: probes.denied_with("known", "store_timeout", start))
            await eventually(
                lambda: all(len(probes.since(start, role)) >= 3 for role in probes.roles)
            )
            healed = time.monotonic()
            p.heal()
            await eventually(lambda: probes.streak("known", healed) >= 3, RECOVER_WITHIN)
            tally.notes["admitted again after (s)"] = round(time.monotonic() - healed, 2)
        finally:
            await probes.stop()
        assert (p.stats.delayed if fault == "slow" else p.stats.dropped) > 0
        # The deny is the service's, at its deadline: it did wait for the store.
        timeouts = [o for o in probes.since(start) if o.reason == "store_timeout"]
        assert min(o.elapsed for o in timeouts) >= BACKEND_TIMEOUT * 0.9
        assert r.svc.proc.poll() is None
        assert set(tally.reasons("revoked")) <= {"revoked", "store_timeout"}
        assert set(tally.reasons("unknown")) <= {"unknown_user", "store_timeout"}
        tally.check()


@pytest.mark.parametrize("toward", ["service", "server"])
async def test_half_closed_connection(
    proxy: tuple[NatsServer, FaultProxy],
    keys: Keys,
    tmp_path: Path,
    tally: Tally,
    toward: Literal["service", "server"],
) -> None:
    server, p = proxy
    async with rig(server, keys, tmp_path, url=p.url) as r:
        svc = r.svc
        assert svc is not None
        probes = Probes(r.witness, server.url, tally, r.users).start()
        try:
            await eventually(lambda: probes.streak("known", 0.0) >= 2)
            probes.going_down()
            cut = time.monotonic()
            assert p.half_close(toward) >= 1
            await svc.await_event("nats_disconnected")
            await svc.await_event("nats_reconnected")
            probes.back_up()
            back = time.monotonic()
            tally.notes["reconnected after (s)"] = round(back - cut, 2)
            await probes.recovered(back, RECOVER_WITHIN)
        finally:
            await probes.stop()
        assert p.stats.connections >= 2  # it came back on a new connection
        assert svc.proc.poll() is None
        tally.check()


async def test_revocation_while_jetstream_stalls(
    proxy: tuple[NatsServer, FaultProxy], keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    """JetStream stalls for the service (its store traffic held back both ways, the watch's
    deliveries included) just as a user is revoked. The users cache may go on admitting that
    user for its contract's bound (`CACHE_STALENESS`, 100 ms after the revocation was
    acknowledged), never longer; after that the user is denied by the service
    (`store_timeout`: the bucket does not answer either)."""
    server, p = proxy
    late_seed, late = new_user()
    async with rig(server, keys, tmp_path, serve=None) as r:
        kv = await users_bucket(r.admin)
        await kv.put(late, record("late", admin=True))
        svc = await r.serve(url=p.url)
        await svc.await_event("users_cache_live", users=3)
        assert (await tried(tally, r.witness, server.url, late_seed, "known")).admitted

        p.delay(CACHE_STALENESS + 2.0, inbound=True)
        await kv.put(late, record("late", admin=True, revoked=True))  # acknowledged
        revoked = time.monotonic()
        r.users.other["revoked_late"] = late_seed
        probes = Probes(r.witness, server.url, tally, r.users, roles=("revoked_late",)).start()
        try:
            after = revoked + CACHE_STALENESS
            await eventually(lambda: len(probes.since(after)) >= 3, CACHE_STALENESS + 5)
        finally:
            await probes.stop()
        p.heal()
    admitted = [t - revoked for t, o in probes.seen if o.admitted]
    tally.notes["revoked user admitted until (s after the revocation)"] = round(
        max(admitted, default=0.0), 2
    )
    tally.notes["admits within the staleness bound"] = probes.within_staleness(
        "revoked_late", revoked
    )
    assert {o.reason for o in probes.since(after)} == {"store_timeout"}
    tally.check()
