"""The server's verdict against a real nats-server (issue: "The server's verdict"). Our record
validation accepts everything the server accepts in a permission list (it is stricter: no
spaces at all, docs/protocol.md §3 check 11), so the deliberately broken record is one the server
rejects at registration: it names an account we allow (`--allowed-account GHOST`) that the
server's configuration does not have (§3 check 15, "an unknown one gives No valid account").
We admit; the server refuses; the service logs it at error level, correlated to our admit,
and counts it.
"""

from __future__ import annotations

from tests.support.nats import (
    Keys,
    NatsServer,
    auth_errors,
    nats_connect,
    new_user,
    next_event,
    raw_connect,
)
from tests.support.operate import captured_logs, operated, scrape, value
from tests.support.service import APP, record, users_bucket
from tests.support.wait import eventually


async def test_a_rejected_admit_is_logged_and_counted(server: NatsServer, keys: Keys) -> None:
    ghost_seed, ghost = new_user()
    good_seed, good = new_user()
    stranger_seed, stranger = new_user()
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        kv = await users_bucket(admin)
        await kv.put(ghost, record("ghostly", account="GHOST"))
        await kv.put(good, record("fine"))
        events = await auth_errors(admin)
        with captured_logs() as logs:
            async with operated(server, keys, allowed_accounts=frozenset({APP, "GHOST"})) as op:
                # Controls first: an admit the server accepts, and our own deny. Neither is a
                # server rejection; the events are handled in order, so when the ghost's is
                # counted below, these were already seen and not counted.
                assert (await raw_connect(server.url, good_seed)).admitted
                assert not (await raw_connect(server.url, stranger_seed)).admitted
                await next_event(events, lambda e: e["client"].get("user") == stranger)

                result = await raw_connect(server.url, ghost_seed)
                assert not result.admitted and result.error == "Authorization Violation"
                event = await next_event(events, lambda e: e["client"].get("user") == ghost)
                assert event["reason"].startswith('No valid account "GHOST"')

                async def counted() -> bool:
                    page = await scrape(op.port)
                    return (
                        value(page, "callout_server_rejections_total", kind="unknown_account") == 1
                    )

                await eventually(counted)
                page = await scrape(op.port)
                total = sum(
                    value(page, "callout_server_rejections_total", kind=k) or 0
                    for k in ("unknown_account", "wrong_issuer", "invalid_user_jwt", "other")
                )
                assert total == 1
                # Our own log still says we admitted it; the verdict line is the only signal.
                assert value(page, "callout_decisions_total", decision="admit", reason="admit") == 2

        (line,) = logs.named("server_rejected")
        level, fields = line
        assert level == "error"
        assert fields["client"] == ghost and fields["our_reason"] == "admit"
        assert fields["account"] == "GHOST" and fields["name"] == "ghostly"
        assert fields["server"] == result.info["server_id"]
        assert fields["kind"] == "unknown_account"
        assert fields["server_reason"] == event["reason"]
        assert fields["cid"] == event["client"]["id"]
    finally:
        await admin.close()
