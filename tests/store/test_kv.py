"""KV writes (`callout users add/revoke/import`) against a real nats-server: a write that found
no stream is sent again, because no responders means nothing was stored; any other outcome
is reported as it is, never sent twice. Creating the bucket: a create whose answer was lost
is judged by whether the bucket exists, and the CLI says what failed in one line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from callout import migrate
from callout.cli import main
from callout.store import StoreError
from callout.store import kv as kvstore
from tests.support.nats import Keys, nats_connect, new_user
from tests.support.service import seed_files, users_bucket


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


async def test_a_failed_revision_check_is_false_after_one_attempt(
    nats_server: Any, keys: Keys
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    kv = await users_bucket(nc)
    _, alice = new_user()
    attempts = 0

    def counted(write: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[object]]:
        def run() -> Awaitable[object]:
            nonlocal attempts
            attempts += 1
            return write()

        return run

    try:
        assert await kvstore.create_key(kv, alice, b"first")
        assert not await kvstore._written(counted(lambda: kv.create(alice, b"second")))
        assert not await kvstore._written(counted(lambda: kv.update(alice, b"third", last=7)))
        assert attempts == 2
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


async def test_a_create_whose_answer_was_lost_finds_the_bucket_made(
    nats_server: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats_connect(nats_server().url, keys.service_seed)
    calls = lose_create_answers(monkeypatch, create=True)
    try:
        await kvstore.ensure_bucket(nc, "users", None)
        assert calls == ["KV_users"]
        info = await kvstore.bucket_info(nc, "users")
        assert info is not None and info.config.max_msgs_per_subject == kvstore.HISTORY
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

    monkeypatch.setattr(migrate, "bucket_entries", timed_out)
    args = ["users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), "list"]
    assert main(args) == 1
    assert capsys.readouterr().err == "callout: error: NATS: timeout\n"
