"""The core path against a real nats-server: known user admitted with its permissions,
unknown user denied with an explicit (fast) error response."""

from __future__ import annotations

from typing import Any

from tests.support.nats import Keys, auth_errors, nats_connect, new_user, next_event, raw_connect
from tests.support.service import record, start_in_process, users_bucket


async def test_known_user_admitted_with_permissions_unknown_denied(
    nats_server: Any, keys: Keys
) -> None:
    server = nats_server(auth_timeout=2)
    admin = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(admin)
    seed, pub = new_user()
    await kv.put(pub, record("alice", pub_allow=["ok.>"], sub_allow=["_INBOX.>"]))
    events = await auth_errors(admin)
    svc = await start_in_process(server, keys)
    try:
        result = await raw_connect(server.url, seed, keep_open=True)
        assert result.admitted, result.error
        assert result.conn is not None
        assert await result.conn.publish("ok.hello", b"hi") is None
        err = await result.conn.publish("nope", b"hi")
        assert err is not None and "Permissions Violation" in err
        await result.conn.close()

        stranger, _ = new_user()
        denied = await raw_connect(server.url, stranger)
        assert not denied.admitted
        assert denied.error == "Authorization Violation"
        assert denied.elapsed < 0.5
        event = await next_event(events, lambda e: "unknown_user" in e.get("reason", ""))
        assert "unknown_user" in event["reason"]
    finally:
        await svc.stop()
        await admin.close()
