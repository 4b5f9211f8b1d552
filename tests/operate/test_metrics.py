"""`/metrics` over HTTP against a real nats-server: the counters move with the decisions the
service makes, the histogram counts them, the gauges read the live service, and no user key
ever becomes a label (issue: "Metrics"; "label values are bounded").
"""

from __future__ import annotations

from tests.support.nats import Keys, NatsServer, nats_connect, new_user, raw_connect
from tests.support.operate import http_get, operated, samples, scrape, value
from tests.support.service import record, users_bucket
from tests.support.wait import eventually


async def test_counters_move_as_decisions_are_made(server: NatsServer, keys: Keys) -> None:
    known_seed, known = new_user()
    internal_seed, internal = new_user()
    stranger_seed, stranger = new_user()
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        await (await users_bucket(admin)).put(known, record("known"))
        async with operated(server, keys, internal_keys=(internal,)) as op:
            before = await scrape(op.port)
            assert (
                value(before, "callout_decisions_total", decision="admit", reason="admit") is None
            )
            assert value(before, "callout_inflight_requests") == 0
            assert value(before, "callout_nats_connected") == 1
            assert value(before, "callout_info", version="0.1.0") == 1
            assert value(before, "callout_store_errors_total", kind="unavailable") == 0

            assert (await raw_connect(server.url, known_seed)).admitted
            assert (await raw_connect(server.url, internal_seed)).admitted
            assert not (await raw_connect(server.url, stranger_seed)).admitted
            assert not (await raw_connect(server.url, known_seed, sig="omit")).admitted
            expected = {
                ("admit", "admit"): 1,
                ("admit", "internal"): 1,
                ("deny", "unknown_user"): 1,
                ("deny", "no_signature"): 1,
            }

            async def counted() -> bool:
                page = await scrape(op.port)
                return all(
                    value(page, "callout_decisions_total", decision=d, reason=r) == n
                    for (d, r), n in expected.items()
                )

            await eventually(counted)
            page = await scrape(op.port)
            assert value(page, "callout_decision_duration_seconds_count", decision="admit") == 2
            assert value(page, "callout_decision_duration_seconds_count", decision="deny") == 2
            # Every decision falls in the +Inf bucket; the latency is a real, positive sum.
            assert (
                value(page, "callout_decision_duration_seconds_bucket", decision="deny", le="+Inf")
                == 2
            )
            total = value(page, "callout_decision_duration_seconds_sum", decision="admit")
            assert total is not None and total > 0
            # Counters only: nothing else among the decisions (no shed, no replay, no expiry).
            assert value(page, "callout_replays_total") == 0
            assert value(page, "callout_requests_expired_total") == 0
            assert value(page, "callout_requests_shed_total") == 0
            for key in (known, internal, stranger):
                assert key not in page

            # The store going away is counted as a store error, by kind.
            assert await admin.jetstream().delete_key_value("users")
            assert not (await raw_connect(server.url, known_seed)).admitted

            async def store_error_counted() -> bool:
                page = await scrape(op.port)
                return value(page, "callout_store_errors_total", kind="unavailable") == 1

            await eventually(store_error_counted)
    finally:
        await admin.close()


async def test_the_endpoint_speaks_prometheus_text(server: NatsServer, keys: Keys) -> None:
    async with operated(server, keys) as op:
        response = await http_get(op.port, "/metrics")
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        names = {name for name, _ in samples(response.body)}
        for name in (
            "callout_inflight_requests",
            "callout_backlog_requests",
            "callout_nats_connected",
            "callout_server_rejections_total",
            "callout_store_errors_total",
            "callout_audit_published_total",
        ):
            assert name in names, name
        # No caching store in this service: its gauges are left out rather than faked.
        assert "callout_cache_entries" not in names
        assert "callout_cache_watch_state" not in names
