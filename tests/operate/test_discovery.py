"""NATS service discovery against a real nats-server: `$SRV.PING` finds every replica,
`$SRV.INFO` describes the auth endpoint, `$SRV.STATS` counts the requests it handled (issue:
"NATS service discovery"). The documents are parsed with nats-py's own micro schema classes,
the way its tooling reads them, and checked against the micro v1 schema type names.
"""

from __future__ import annotations

from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from callout.service import SUBJECT
from tests.support.nats import Keys, NatsServer, nats_connect, new_user, raw_connect
from tests.support.operate import gather, operated, ops_args
from tests.support.service import record, users_bucket


async def test_ping_info_and_stats(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    stranger_seed, _ = new_user()
    client = await nats_connect(server.url, keys.service_seed)  # tooling in the callout account
    try:
        await (await users_bucket(client)).put(pub, record("u"))
        async with (
            operated(server, keys, args=ops_args(metrics_addr=None)) as one,
            operated(server, keys, args=ops_args(metrics_addr=None)) as two,
        ):
            ids = {one.ops.discovery.id, two.ops.discovery.id}
            assert len(ids) == 2

            pings = await gather(client, "$SRV.PING", 2)
            assert {p["id"] for p in pings} == ids
            for doc in pings:
                assert doc["type"] == "io.nats.micro.v1.ping_response"
                ping = ServicePing.from_dict(doc)
                assert (ping.name, ping.version) == ("callout", "0.1.0")
            assert {p["id"] for p in await gather(client, "$SRV.PING.callout", 2)} == ids

            (info_doc,) = await gather(client, f"$SRV.INFO.callout.{one.ops.discovery.id}", 1)
            assert info_doc["type"] == "io.nats.micro.v1.info_response"
            info = ServiceInfo.from_dict(info_doc)
            assert info.id == one.ops.discovery.id
            assert [(e.name, e.subject, e.queue_group) for e in info.endpoints] == [
                ("authorize", SUBJECT, "callout")
            ]

            for _ in range(3):
                assert (await raw_connect(server.url, seed)).admitted
            assert not (await raw_connect(server.url, stranger_seed)).admitted

            # The two replicas share the queue group: together they handled all four.
            stats_docs = await gather(client, "$SRV.STATS.callout", 2)
            stats = [ServiceStats.from_dict(doc) for doc in stats_docs]
            assert all(doc["type"] == "io.nats.micro.v1.stats_response" for doc in stats_docs)
            endpoints = [s.endpoints[0] for s in stats]
            assert sum(e.num_requests for e in endpoints) == 4
            assert sum(e.data["admitted"] for e in endpoints) == 3
            assert sum(e.data["denied"] for e in endpoints) == 1
            assert all(e.num_errors == 0 and e.subject == SUBJECT for e in endpoints)
            busy = [e for e in endpoints if e.num_requests]
            assert all(0 < e.average_processing_time <= e.processing_time for e in busy)

            # And each instance answers on its own subject with its own counts.
            for op in (one, two):
                (doc,) = await gather(client, f"$SRV.STATS.callout.{op.ops.discovery.id}", 1)
                endpoint = ServiceStats.from_dict(doc).endpoints[0]
                assert endpoint.num_requests == op.svc.service.stats.requests
    finally:
        await client.close()
