"""The fault proxy itself, with a real server behind it: a fault test that passes because its
proxy did nothing would prove nothing. A client behind the proxy makes a JetStream API request
(store traffic) and a plain request to a responder on a direct connection (everything else)."""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.support.nats import Keys, NatsServer, nats_connect
from tests.support.proxy import FaultProxy

JS_INFO = "$JS.API.INFO"


async def rtt(nc: Client, subject: str, timeout: float = 2.0) -> float:
    start = time.monotonic()
    await nc.request(subject, b"", timeout=timeout)
    return time.monotonic() - start


async def test_delay_drop_blackhole_half_close(server: NatsServer, keys: Keys) -> None:
    responder = await nats_connect(server.url, keys.service_seed)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await responder.subscribe("echo", cb=echo)
    await responder.flush()
    drops = asyncio.Queue[None]()

    async def disconnected() -> None:
        drops.put_nowait(None)

    async with FaultProxy(server.port) as p:
        nc = await nats.connect(
            p.url,
            nkeys_seed_str=keys.service_seed,
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
            disconnected_cb=disconnected,
        )
        try:
            # Store traffic delayed, the rest not.
            p.delay(0.3)
            assert await rtt(nc, JS_INFO) >= 0.3
            assert await rtt(nc, "echo") < 0.2
            # Store traffic lost, the rest not.
            p.drop()
            try:
                await rtt(nc, JS_INFO, timeout=0.5)
                raise AssertionError("a dropped JetStream request was answered")
            except nats.errors.TimeoutError:
                pass
            assert await rtt(nc, "echo") < 0.2
            # Everything lost; healing closes the broken connection, the client reconnects.
            p.drop(store_only=False)
            try:
                await rtt(nc, "echo", timeout=0.5)
                raise AssertionError("a black-holed request was answered")
            except nats.errors.TimeoutError:
                pass
            p.heal()
            await asyncio.wait_for(drops.get(), 5)
            assert await rtt(nc, "echo", timeout=5) < 5
            assert await rtt(nc, JS_INFO) < 1
            # A FIN toward the client: it sees the connection end and comes back.
            assert p.half_close("service") == 1
            await asyncio.wait_for(drops.get(), 5)
            assert await rtt(nc, "echo", timeout=5) < 5
            assert p.stats.connections == 3
        finally:
            await nc.close()
            await responder.close()
