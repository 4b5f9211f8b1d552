"""Processes going away: nats-server restarted under the service, the service SIGKILLed in the
middle of a burst of connects, the service stopped with SIGTERM while requests are in flight.

Requests in flight are made on purpose: the service reaches the store through a `FaultProxy`
that holds its lookups back for 0.3 s (less than `--backend-timeout`, so they still succeed),
with the users cache off (a cache would answer from memory and leave nothing in flight). The
proxy sees each lookup go by, so the test knows which requests the service has taken before
it pulls the trigger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from pathlib import Path

import pytest

from tests.support.nats import Keys, NatsServer, ServerFactory, new_user
from tests.support.proxy import FaultProxy
from tests.support.rig import rig
from tests.support.service import watch
from tests.support.wait import eventually
from tests.support.witness import Outcome, Probes, Tally, attempt, tried

RECOVER_WITHIN = 10.0
#: Lookups held back this long: requests stay in flight, and still succeed.
IN_FLIGHT = 0.3
NO_CACHE = ("--users-cache", "off")


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_nats_server_restarted_under_the_service(
    server: NatsServer, keys: Keys, tmp_path: Path, tally: Tally, hard: bool
) -> None:
    async with rig(server, keys, tmp_path, reconnect=True) as r:
        svc = r.svc
        assert svc is not None
        wire = await watch(r.admin)  # every request and every reply, on the wire
        before = Probes(r.witness, server.url, tally, r.users).start()
        try:
            await eventually(lambda: before.streak("known", 0.0) >= 3)
        finally:
            await before.stop()

        # From here until the service has subscribed again, nobody may be listening.
        during = Probes(r.witness, server.url, tally, r.users)
        during.going_down()
        during.start()
        try:
            restarted = time.monotonic()
            await asyncio.to_thread(server.restart, hard=hard)
            await svc.await_event("nats_reconnected")
            await eventually(lambda: r.witness.nc.is_connected and r.admin.is_connected)
            await r.witness.nc.flush()
            await r.admin.flush()
            first_after = len(wire.inboxes)
            during.back_up()
            back = time.monotonic()
            tally.notes["service subscribed again after (s)"] = round(back - restarted, 2)
            await during.recovered(back, RECOVER_WITHIN)
        finally:
            await during.stop()
        # Exactly one reply to every request since the service came back, and never two
        # replies to one request, before or after. (A request made while nobody was
        # subscribed has none: the server timed it out.)
        since_back = wire.inboxes[first_after:]
        await eventually(lambda: all(wire.replies[inbox] >= 1 for inbox in since_back))
        assert len(since_back) >= 9 and all(wire.replies[inbox] == 1 for inbox in since_back)
        assert max(wire.replies.values()) == 1
        assert svc.proc.poll() is None
        assert svc.events("handler_error") == []
        tally.check()


async def test_service_killed_mid_burst_then_restarted(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    """Requests the killed service had taken are lost: the server denies those clients at its
    timeout, and they are admitted on a retry once a service is back.

    The timeout is 1.5 s rather than 1 s: the request's `exp` is the server's deadline
    truncated to whole seconds, so with 1 s it can be only milliseconds away, and the service
    (which never waits past `exp`) denies `store_timeout` before its own --backend-timeout."""
    server = nats_server(auth_timeout=1.5)
    async with FaultProxy(server.port) as p, rig(server, keys, tmp_path, serve=None) as r:
        known = await r.known_users(30)
        svc = await r.serve(*NO_CACHE, url=p.url)
        p.delay(IN_FLIGHT)
        clients = [(seed, pub, "known") for seed, pub in known]
        for i in range(0, len(clients), 5):
            clients.insert(i, (r.users.revoked[0], r.users.revoked[1], "revoked"))
            unknown_seed, unknown = new_user()
            clients.insert(i + 1, (unknown_seed, unknown, "unknown"))
        ended: dict[int, tuple[float, Outcome]] = {}

        async def client(i: int, seed: str, role: str) -> None:
            await asyncio.sleep(i * 0.015)  # shapes the burst; nothing waits on it
            outcome = await attempt(r.witness, server.url, seed, role)
            assert outcome is not None
            ended[i] = (time.monotonic(), outcome)

        burst = [asyncio.create_task(client(i, s, role)) for i, (s, _, role) in enumerate(clients)]

        def taken_not_decided() -> int:
            decided = {d["client"] for d in svc.events("decision")}
            return sum(1 for _, pub, _ in clients if p.stats.touched(pub) and pub not in decided)

        await eventually(lambda: len(svc.events("decision")) >= 5)
        await eventually(lambda: taken_not_decided() >= 3)
        killed = time.monotonic()
        svc.kill()
        await asyncio.gather(*burst)

        # Outcomes that ended after the kill came while the service was down.
        for end, outcome in ended.values():
            tally.add(dataclasses.replace(outcome, up=end < killed))
        lost = [o for _, o in ended.values() if o.reason == "timeout"]
        assert len(lost) >= 3
        assert all(o.elapsed >= 1.4 for o in lost)  # the server's timeout, not an answer

        p.heal()
        await r.serve(*NO_CACHE, url=p.url)
        retried = 0
        for i, (seed, _, role) in enumerate(clients):
            if role == "known" and not ended[i][1].admitted:
                outcome = await tried(tally, r.witness, server.url, seed, role)
                assert outcome.admitted
                retried += 1
        for role in ("revoked", "unknown"):
            outcome = await tried(tally, r.witness, server.url, r.users.seed(role), role)
            assert not outcome.admitted and outcome.ours
        assert retried > 0
        tally.notes["denied at the server's timeout (in flight, or sent while none ran)"] = len(
            lost
        )
        tally.notes["admitted on retry after the restart"] = retried
        tally.check()


async def test_sigterm_answers_every_request_in_flight(
    server: NatsServer, keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    async with FaultProxy(server.port) as p, rig(server, keys, tmp_path, serve=None) as r:
        known = await r.known_users(20)
        svc = await r.serve(*NO_CACHE, url=p.url)
        p.delay(IN_FLIGHT)
        clients = [(seed, pub, "known") for seed, pub in known]
        clients.append((r.users.revoked[0], r.users.revoked[1], "revoked"))
        for _ in range(3):
            unknown_seed, unknown = new_user()
            clients.append((unknown_seed, unknown, "unknown"))
        burst = [
            asyncio.create_task(attempt(r.witness, server.url, seed, role))
            for seed, _, role in clients
        ]
        # Every request taken, its lookup held back: all of them are in flight now.
        await eventually(lambda: all(p.stats.touched(pub) for _, pub, _ in clients))
        assert svc.events("decision") == []
        svc.proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*burst)
        assert await asyncio.to_thread(svc.proc.wait, 10) == 0

        for (_, _, role), outcome in zip(clients, outcomes, strict=True):
            assert outcome is not None
            tally.add(outcome)
            assert outcome.admitted is (role == "known"), outcome
        stopped = svc.wait_for("stopped")
        assert stopped["replies"] == len(clients)
        tally.check()


async def test_sigterm_answers_requests_already_on_their_way(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    """A request the server routed to this replica just before SIGTERM is in flight too: it is
    on the wire (held 0.4 s by the proxy, both ways) when the service stops. nats-py's
    `unsubscribe()` drops whatever arrives for the subscription afterwards, so the client
    waits for the server's timeout; `drain()` (UNSUB, then a round trip that flushes out
    everything sent before it) would answer it. Latency bounds do not apply: the link is slow."""
    server = nats_server()
    async with FaultProxy(server.port) as p, rig(server, keys, tmp_path, url=p.url) as r:
        svc = r.svc
        assert svc is not None
        wire = await watch(r.admin)
        p.delay(0.4, store_only=False)
        burst = [
            asyncio.create_task(attempt(r.witness, server.url, r.users.seed(role), role))
            for role in ("known", "unknown", "unknown", "unknown", "revoked")
        ]
        await eventually(lambda: len(wire.inboxes) == len(burst))  # sent to the service
        svc.proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*burst)
        await asyncio.to_thread(svc.proc.wait, 10)
        for outcome in outcomes:
            assert outcome is not None
            tally.add(dataclasses.replace(outcome, bounded=False))
        tally.check()
