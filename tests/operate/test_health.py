"""`/healthz` and `/readyz` against a real nats-server: ready flips to not ready when the users
bucket or the NATS server goes away, and back when they return, with the reason in the body
(issue: "Health"). While not ready for lack of a store, internal identities are still
admitted: that is the degraded state the body names.
"""

from __future__ import annotations

from tests.support.nats import Keys, NatsServer, nats_connect, new_user, raw_connect
from tests.support.operate import Http, http_get, operated, scrape, value
from tests.support.service import record, users_bucket
from tests.support.wait import eventually


async def readyz_becomes(port: int, status: int) -> Http:
    seen: list[Http] = []

    async def check() -> bool:
        seen.append(await http_get(port, "/readyz"))
        return seen[-1].status == status

    await eventually(check)
    return seen[-1]


async def test_readyz_follows_the_users_bucket(server: NatsServer, keys: Keys) -> None:
    internal_seed, internal = new_user()
    user_seed, user = new_user()
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        await (await users_bucket(admin)).put(user, record("u"))
        async with operated(server, keys, internal_keys=(internal,)) as op:
            ready = await http_get(op.port, "/readyz")
            assert (ready.status, ready.body) == (200, "ready\n")
            assert ready.headers["cache-control"] == "no-store"

            assert await admin.jetstream().delete_key_value("users")
            degraded = await readyz_becomes(op.port, 503)
            assert degraded.body.startswith("not ready: degraded: only internal identities")
            assert "does not exist" in degraded.body
            assert value(await scrape(op.port), "callout_ready") == 0
            # What the body says is what happens.
            assert (await raw_connect(server.url, internal_seed)).admitted
            assert not (await raw_connect(server.url, user_seed)).admitted
            assert (await http_get(op.port, "/healthz")).status == 200  # alive all along

            await (await users_bucket(admin)).put(user, record("u"))
            back = await readyz_becomes(op.port, 200)
            assert back.body == "ready\n"
            assert value(await scrape(op.port), "callout_ready") == 1
            assert (await raw_connect(server.url, user_seed)).admitted
    finally:
        await admin.close()


async def test_readyz_follows_the_nats_connection(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        await (await users_bucket(admin)).put(pub, record("u"))
    finally:
        await admin.close()
    async with operated(server, keys) as op:
        assert (await http_get(op.port, "/readyz")).status == 200

        await server.astop()
        down = await readyz_becomes(op.port, 503)
        assert down.body == "not ready: not connected to NATS\n"
        assert (await http_get(op.port, "/healthz")).body == "ok\n"
        assert value(await scrape(op.port), "callout_nats_connected") == 0

        await server.astart()  # same port and JetStream directory
        assert (await readyz_becomes(op.port, 200)).body == "ready\n"
        # Ready means requests reach us again: the subscription came back with the connection.
        assert (await raw_connect(server.url, seed)).admitted
