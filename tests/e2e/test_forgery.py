"""The client's proof of key, against a real nats-server. The server does not verify the nonce
signature of an nkey it does not know (docs/protocol.md §1, "The server does not check nkeys it
doesn't know"): every forged CONNECT below reaches the service, which must deny it. Legit
clients are admitted whichever base64 flavour their `sig` uses (nats-py: padded standard;
Go clients: RawURL).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import pytest
from nats.aio.msg import Msg

from tests.support.admission import deployment, expect_denied, jwt_claims, user_info
from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    NatsServer,
    nats_connect,
    new_account,
    new_user,
    raw_connect,
)
from tests.support.service import APP, record


async def test_legit_clients_admitted_with_either_sig_encoding(
    server: NatsServer, keys: Keys
) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(pub, record("both", pub_allow=["$SYS.REQ.USER.INFO"], sub_allow=["_INBOX.>"]))
        # Watch the requests the server sends, to see which sig encoding each client used.
        sigs: asyncio.Queue[str] = asyncio.Queue()

        async def on_request(msg: Msg) -> None:
            claims = jwt_claims(msg.data)
            nats = claims["nats"]
            assert isinstance(nats, dict)
            sigs.put_nowait(nats["connect_opts"]["sig"])

        await dep.admin.subscribe(AUTH_SUBJECT, cb=on_request)
        await dep.admin.flush()

        nc = await nats_connect(server.url, seed)  # nats-py
        try:
            assert (await user_info(nc))["account"] == APP
        finally:
            await nc.close()
        sig = await asyncio.wait_for(sigs.get(), 5)
        assert len(sig) == 88 and sig.endswith("=")  # padded standard base64 (§1)

        encodings: tuple[tuple[Literal["rawurl", "std"], int], ...] = (("rawurl", 86), ("std", 88))
        for encoding, length in encodings:
            result = await raw_connect(server.url, seed, sig_encoding=encoding)
            assert result.admitted, (encoding, result.error)
            sig = await asyncio.wait_for(sigs.get(), 5)
            assert sig == result.connect["sig"] and len(sig) == length


async def test_known_key_with_another_keys_signature_denied(server: NatsServer, keys: Keys) -> None:
    _, known = new_user()
    other_seed, _ = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(known, record("victim", admin=True))
        # Claims `known`, signs the (fresh, correct) nonce with `other`.
        await expect_denied(dep, other_seed, "bad_signature", nkey=known)


async def test_internal_key_with_another_keys_signature_denied(
    server: NatsServer, keys: Keys
) -> None:
    internal_seed, internal = new_user()
    other_seed, _ = new_user()
    async with deployment(server, keys, internal_keys=(internal,)) as dep:
        await expect_denied(dep, other_seed, "bad_signature", nkey=internal)
        await expect_denied(dep, internal_seed, "no_signature", sig="omit")
        # The real holder of the internal key is admitted (with no record at all).
        assert (await raw_connect(server.url, internal_seed)).admitted


async def test_missing_signature_denied(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(pub, record("nosig", admin=True))
        await expect_denied(dep, seed, "no_signature", sig="omit")
        await expect_denied(dep, None, "no_signature", nkey=pub, sig="")
        assert (await raw_connect(server.url, seed)).admitted  # control: the record is fine


async def test_signature_over_wrong_nonce_or_replayed_denied(
    server: NatsServer, keys: Keys
) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(pub, record("replayed", admin=True))
        await expect_denied(dep, seed, "bad_signature", sign_nonce_override=b"not-the-nonce")
        # A CONNECT captured from an earlier, admitted connection: its sig covers that
        # connection's nonce, and every connection gets a fresh one.
        first = await raw_connect(server.url, seed)
        assert first.admitted
        replay = await expect_denied(dep, None, "bad_signature", nkey=pub, sig=first.connect["sig"])
        assert replay.info["nonce"] != first.info["nonce"]


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param("!!!!", id="not-base64"),
        pytest.param(base64.b64encode(b"short").decode(), id="too-short"),
        pytest.param("A" * 200, id="too-long"),
    ],
)
async def test_garbage_signature_denied(server: NatsServer, keys: Keys, sig: str) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(pub, record("garbled", admin=True))
        await expect_denied(dep, seed, "bad_signature", sig=sig)


@pytest.mark.parametrize("kind", ["account", "curve", "garbage"])
async def test_nkey_that_is_not_a_user_key_denied(
    server: NatsServer, keys: Keys, kind: str
) -> None:
    seed, pub = new_user()
    claimed = {
        "account": new_account()[1],
        "curve": keys.xkey_pub,
        "garbage": "UNOTAKEY",
    }[kind]
    async with deployment(server, keys) as dep:
        await dep.put(pub, record("typo", admin=True))
        await expect_denied(dep, seed, "bad_nkey", nkey=claimed)


@pytest.mark.parametrize(
    ("extra", "user"),
    [
        pytest.param({"user": "bob", "pass": "secret"}, "bob", id="user-password"),
        pytest.param({"auth_token": "s3cr3t"}, "[REDACTED]", id="token"),
    ],
)
async def test_client_without_nkey_denied(
    server: NatsServer, keys: Keys, extra: dict[str, str], user: str
) -> None:
    async with deployment(server, keys) as dep:
        await expect_denied(dep, None, "no_nkey", user=user, connect_extra=extra)
