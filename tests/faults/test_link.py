"""The link between the service and nats-server misbehaves (`FaultProxy` in between; clients
connect to the server directly):

- the store is slowed past `--backend-timeout`, or its messages are lost: auth requests and
  replies still flow, so every deny must come from the service, `store_timeout`, within
  `--backend-timeout` + 100 ms, never from the server's timeout;
- the connection is half-closed, toward the service or toward the server: the service notices,
  reconnects and subscribes again by itself. While it is reconnecting nobody is subscribed, so
  the server times those clients out (it has no fast path for "no responders", protocol.md §3):
  those attempts are counted as made while the service was down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from tests.conftest import ServerFactory
from tests.faults.proxy import FaultProxy
from tests.faults.rig import rig
from tests.faults.scenario import BACKEND_TIMEOUT, Probes, Tally, eventually
from tests.harness import Keys, NatsServer

RECOVER_WITHIN = 10.0
#: Past the users cache's stream probe timeout (1 s) as well as --backend-timeout, so the
#: cache stops answering and lookups go to the (slow) bucket.
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
        up = True
        probes = Probes(r.witness, server.url, tally, r.users, up=lambda: up).start()
        try:
            await eventually(lambda: probes.streak("known", 0.0) >= 2)
            up = False
            cut = time.monotonic()
            assert p.half_close(toward) >= 1
            await svc.await_event("nats_disconnected")
            await svc.await_event("nats_reconnected")
            up = True
            back = time.monotonic()
            tally.notes["reconnected after (s)"] = round(back - cut, 2)
            await eventually(lambda: probes.streak("known", back) >= 3, RECOVER_WITHIN)
            await eventually(
                lambda: all(len(probes.since(back, role)) >= 3 for role in probes.roles)
            )
        finally:
            await probes.stop()
        assert p.stats.connections >= 2  # it came back on a new connection
        assert svc.proc.poll() is None
        if tally.unanswered:
            print("DEBUG cut", cut, "back", back, "conns", p.stats.connections)
            for t0, o in probes.seen:
                print("DEBUG", round(t0 - cut, 3), o)
            for line in svc.raw:
                if '"decision"' not in line:
                    print("DEBUG", line)
            print("DEBUG decisions", len(svc.events("decision")))
            print("DEBUG server log", server.log_since_start()[-3000:])
        tally.check()
