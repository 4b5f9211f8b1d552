"""KV writes (`callout users add/revoke/import`, the shared replay record) against a real
nats-server: a write that found no stream is sent again, because no responders means nothing
was stored; any other outcome is reported as it is, never sent twice. Creating either bucket:
a create whose answer was lost is judged by whether the bucket exists, and the CLI says what
failed in one line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js.client import JetStreamContext

from callout.cli import main
from callout.commands import users
from callout.store import StoreError
from callout.store import kv as kvstore
from callout.store.seen import SEEN, SeenRecord
from tests.support.nats import Keys, nats_connect, new_user
from tests.support.service import seed_files, users_bucket


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pause only lets a stream's interest travel; these tests make the stream appear
    # between attempts themselves.
    monkeypatch.setattr(kvstore, "_NO_RESPONDERS_WAIT", 0)


def once(nc: Any, key: str, value: bytes, revision: int = 0) -> Awaitable[bool]:
    """One attempt of the conditional write, to a bucket that need not exist."""
    return kvstore._put_once(nc, "users", key, value, revision, 5.0)


async def test_a_write_that_found_no_stream_is_sent_again(nats_server: Any, keys: Keys) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    _, alice = new_user()
    attempts = 0

    async def write() -> bool:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            await users_bucket(nc)  # the stream appears after two writes found nobody
        return await once(nc, alice, b"v")

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

    async def write() -> bool:
        nonlocal attempts
        attempts += 1
        return await once(nc, alice, b"v")

    try:
        with pytest.raises(StoreError, match="no stream answered the write"):
            await kvstore._written(write)
        assert attempts == kvstore._NO_RESPONDERS_RETRIES + 1
    finally:
        await nc.close()


async def test_a_failed_revision_check_is_false_after_one_attempt(
    nats_server: Any, keys: Keys
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    await users_bucket(nc)
    _, alice = new_user()
    attempts = 0

    def counted(write: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
        def run() -> Awaitable[bool]:
            nonlocal attempts
            attempts += 1
            return write()

        return run

    try:
        assert await kvstore.create(nc, "users", alice, b"first")
        assert not await kvstore._written(counted(lambda: once(nc, alice, b"second")))
        assert not await kvstore._written(counted(lambda: once(nc, alice, b"third", 7)))
        assert attempts == 2
        assert not await kvstore.create(nc, "users", alice, b"again")
        assert await kvstore.update(nc, "users", alice, b"fourth", revision=1)
        assert await kvstore.KVStore(nc).get_entry(alice) == (b"fourth", 2)
    finally:
        await nc.close()


async def test_a_deleted_key_is_created_again_over_its_delete_marker(
    nats_server: Any, keys: Keys
) -> None:
    # `users add` after the record was deleted (with the nats CLI): the key has no live value.
    nc = await nats_connect(nats_server().url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    try:
        assert await kvstore.create(nc, "users", alice, b"first")
        await kv.delete(alice)
        assert await kvstore.KVStore(nc).get_entry(alice) is None
        assert await kvstore.create(nc, "users", alice, b"second")
        assert await kvstore.KVStore(nc).get_entry(alice) == (b"second", 3)
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


# -- creating the bucket ------------------------------------------------------------------


def lose_create_answers(monkeypatch: pytest.MonkeyPatch, *, create: bool) -> list[str]:
    """Stream creates time out on the client; with `create`, after the server made the stream
    (its answer lost, as seen on a cluster just formed), without, before it got the request."""
    original = JetStreamContext.add_stream
    calls: list[str] = []

    async def add_stream(self: JetStreamContext, config: Any = None, **params: Any) -> Any:
        # A replicated stream may take an election to answer: more than nats-py's 5 s default.
        assert self._timeout == kvstore.CREATE_TIMEOUT
        calls.append(config.name)
        if create:
            await original(self, config, **params)
        raise nats.errors.TimeoutError

    monkeypatch.setattr(JetStreamContext, "add_stream", add_stream)
    return calls


@pytest.mark.parametrize("kind", [kvstore.USERS, SEEN], ids=["users", "replay"])
async def test_a_create_whose_answer_was_lost_finds_the_bucket_made(
    kind: kvstore.BucketKind, nats_server: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    calls = lose_create_answers(monkeypatch, create=True)
    bucket = "users" if kind is kvstore.USERS else "replay"
    try:
        if kind is kvstore.USERS:
            await kvstore.ensure_bucket(nc, bucket, None)
        else:
            await SeenRecord(nc, bucket).ensure(None)
        assert calls == [f"KV_{bucket}"]
        info = await kvstore.bucket_info(nc, bucket, kind)
        assert info is not None
        if kind is kvstore.USERS:
            assert info.config.max_msgs_per_subject == kvstore.HISTORY
        else:
            assert (info.config.max_msgs_per_subject, info.config.max_age) == (1, 120.0)
            # And it records: the first sight of a request is new, the second is not.
            record = SeenRecord(nc, bucket)
            assert await record.first_sight("NSERVER", "UKEY", "nonce")
            assert not await record.first_sight("NSERVER", "UKEY", "other")
    finally:
        await nc.close()


async def test_a_create_that_never_happened_is_a_store_error(
    nats_server: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    lose_create_answers(monkeypatch, create=False)
    try:
        with pytest.raises(StoreError, match=r"did not confirm creating bucket 'users' in 20 s"):
            await kvstore.ensure_bucket(nc, "users", None)
        assert await kvstore.bucket_info(nc, "users") is None
    finally:
        await nc.close()


def test_the_cli_says_a_lost_create_in_one_line(
    nats_server: Any,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = nats_server()
    files = seed_files(keys, tmp_path / "keys")
    lose_create_answers(monkeypatch, create=False)
    args = ["users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), "list"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == (
        "callout: error: JetStream did not confirm creating bucket 'users' in 20 s,"
        " and it does not exist\n"
    )


def test_a_nats_failure_no_command_mapped_is_one_line_too(
    nats_server: Any,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = nats_server()
    files = seed_files(keys, tmp_path / "keys")

    async def timed_out(*_: object) -> object:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(users.kvstore, "entries", timed_out)
    args = ["users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), "list"]
    assert main(args) == 1
    assert capsys.readouterr().err == "callout: error: NATS: timeout\n"
