"""xkey encryption of requests and responses (docs/protocol.md §2), against a real nats-server:
on and off, both admitting and denying, and both ways of getting the configuration wrong.

A second AUTH-account subscriber sees the traffic (`$SYS.REQ.USER.AUTH` and the server's
private reply inboxes `$SYS._INBOX.>` are ordinary subjects in the callout account), which
shows what actually went over the wire.
"""

from __future__ import annotations

import pytest

from tests.support.admission import denied, deployment, expect_denied, granted, info_as, perms
from tests.support.nats import Keys, ServerFactory, new_curve, new_user
from tests.support.service import APP, record, watch

XKEY_HEADER = "Nats-Server-Xkey"
#: The server's reason for an empty response body (docs/protocol.md §3, check 1).
NO_REASON = 'Auth callout violation: "no reason supplied" on account "AUTH"'
FAST_DENY = 0.5


@pytest.mark.parametrize("encrypted", [True, False], ids=["xkey-on", "xkey-off"])
async def test_admit_and_deny_with_and_without_xkey(
    nats_server: ServerFactory, keys: Keys, encrypted: bool
) -> None:
    server = nats_server(xkey=encrypted)
    seed, pub = new_user()
    stranger, _ = new_user()
    async with deployment(server, keys, xkey=encrypted) as dep:
        await dep.put(pub, record("x", pub_allow=["$SYS.REQ.USER.INFO"], sub_allow=["_INBOX.>"]))
        wire = await watch(dep.admin)

        info = await info_as(server.url, seed)
        assert info["account"] == APP
        assert granted(info) == perms(["$SYS.REQ.USER.INFO"], [], ["_INBOX.>"], [])
        admitted_reply = await wire.reply()

        await expect_denied(dep, stranger, "unknown_user")
        denied_reply = await wire.reply()

        assert len(wire.requests) == 2
        for request in wire.requests:
            headers = request.headers or {}
            assert (XKEY_HEADER in headers) is encrypted
            assert request.data.startswith(b"xkv1" if encrypted else b"eyJ")
        # Responses go back encrypted exactly when the request was.
        for reply in (admitted_reply, denied_reply):
            assert reply.data.startswith(b"xkv1" if encrypted else b"eyJ")


async def test_server_encrypts_but_service_has_no_xkey_denied_fast(
    nats_server: ServerFactory, keys: Keys
) -> None:
    server = nats_server(xkey=True)
    seed, pub = new_user()
    async with deployment(server, keys) as dep:  # no xkey on the service side
        await dep.put(pub, record("x", admin=True))
        wire = await watch(dep.admin)
        result, reason = await denied(dep, seed)
        assert reason == NO_REASON
        assert result.elapsed < FAST_DENY
        reply = await wire.reply()
        assert reply.data == b""  # the empty body: the server's immediate deny (§3 check 1)
        assert "no reason supplied" in server.log_text()


async def test_server_encrypts_to_another_key_denied_fast(
    nats_server: ServerFactory, keys: Keys
) -> None:
    _, foreign = new_curve()
    server = nats_server(xkey=foreign)
    seed, pub = new_user()
    async with deployment(server, keys, xkey=True) as dep:
        await dep.put(pub, record("x", admin=True))
        result, reason = await denied(dep, seed)
        assert reason == NO_REASON
        assert result.elapsed < FAST_DENY


async def test_service_has_xkey_but_server_does_not_encrypt_denied(
    nats_server: ServerFactory, keys: Keys
) -> None:
    server = nats_server()  # no auth_callout xkey
    seed, pub = new_user()
    async with deployment(server, keys, xkey=True) as dep:
        await dep.put(pub, record("x", admin=True))
        await expect_denied(dep, seed, "xkey_required")
