"""KV writes (`callout users add/revoke/import`) against a real nats-server: a write that found
no stream is sent again, because no responders means nothing was stored; any other outcome
is reported as it is, never sent twice."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest
from nats.js.kv import KeyValue

from callout.store import StoreError
from callout.store import kv as kvstore
from tests.harness import Keys, nats_connect, new_user
from tests.service import users_bucket


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pause only lets a stream's interest travel; these tests make the stream appear
    # between attempts themselves.
    monkeypatch.setattr(kvstore, "_NO_RESPONDERS_WAIT", 0)


def unbound(nc: Any, bucket: str = "users") -> KeyValue:
    """A nats-py KeyValue handle for a bucket that need not exist (key_value() checks)."""
    return KeyValue(
        name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=nc.jetstream(), direct=False
    )


async def test_a_write_that_found_no_stream_is_sent_again(nats_server: Any, keys: Keys) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    handle = unbound(nc)
    _, alice = new_user()
    attempts = 0

    async def write() -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            await users_bucket(nc)  # the stream appears after two writes found nobody
        return await handle.create(alice, b"v")

    try:
        assert await kvstore._written(write)
        assert attempts == 3
        assert await kvstore.KVStore(nc).get_entry(alice) == (b"v", 1)
    finally:
        await nc.close()


async def test_no_stream_at_all_is_a_store_error_after_the_retries(
    nats_server: Any, keys: Keys
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    _, alice = new_user()
    attempts = 0
    handle = unbound(nc)

    async def write() -> object:
        nonlocal attempts
        attempts += 1
        return await handle.create(alice, b"v")

    try:
        with pytest.raises(StoreError, match="no stream answered the write"):
            await kvstore._written(write)
        assert attempts == kvstore._NO_RESPONDERS_RETRIES + 1
    finally:
        await nc.close()


async def test_a_failed_revision_check_is_false_and_not_sent_again(
    nats_server: Any, keys: Keys
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    try:
        assert await kvstore.create_key(kv, alice, b"first")
        assert not await kvstore.create_key(kv, alice, b"second")
        assert not await kvstore.update_key(kv, alice, b"third", revision=7)
        assert await kvstore.update_key(kv, alice, b"fourth", revision=1)
        assert await kvstore.KVStore(nc).get_entry(alice) == (b"fourth", 2)
    finally:
        await nc.close()


async def test_a_write_whose_outcome_is_unknown_is_not_sent_again() -> None:
    # A timeout may come after the stream stored the write: sending it again could store it
    # twice (or report a create as a conflict with itself), so it goes to the caller.
    attempts = 0

    async def write() -> object:
        nonlocal attempts
        attempts += 1
        raise nats.errors.TimeoutError

    with pytest.raises(nats.errors.TimeoutError):
        await kvstore._written(write)
    assert attempts == 1
