"""The JetStream KV `users` bucket: lookups for the service, and management for `callout users`.

Lookups do not use nats-py's KeyValue.get, for two reasons that are both about failing
closed. nats-py maps "stream not found" (the bucket was deleted) to KeyNotFoundError, i.e.
to "no record", which in soft mode would admit everyone; and it binds the bucket once, so a
service started before the bucket existed would need a restart. Instead each lookup is one
`STREAM.MSG.GET` request for the key's last message, answered by the stream leader (so a
revocation is seen as soon as it is written, unlike a direct get from a lagging replica),
and every JetStream error code other than "no message found" is a StoreError.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType, StreamInfo
from nats.js.kv import KeyValue

from callout.store.base import StoreError, WouldBlock

# JetStream API error codes (nats-server server/errors.json).
_NO_MESSAGE = 10037  # JSNoMessageFoundErr
_STREAM_NOT_FOUND = 10059  # JSStreamNotFoundErr
HISTORY = 5
# A replicated stream answers its create once its replicas have elected a leader: usually
# within a second, but one raft election timeout (several seconds) when the first campaign
# fails on a busy cluster. nats-py's 5 s API default is too short for that.
CREATE_TIMEOUT = 20.0


# A KV delete or purge is a message with a KV-Operation header; nats-server 2.11+ marks
# per-message TTL expiries with Nats-Marker-Reason instead.
_DELETE_OPS = frozenset({"DEL", "PURGE"})
_MARKER_DELETES = frozenset({"MaxAge", "Purge", "Remove"})


def is_delete(headers: Mapping[str, str] | None) -> bool:
    """Whether a watched KV message removes its key (headers as nats-py parses them)."""
    if not headers:
        return False
    return (
        headers.get("KV-Operation") in _DELETE_OPS
        or headers.get("Nats-Marker-Reason") in _MARKER_DELETES
    )


def stream_name(bucket: str) -> str:
    return f"KV_{bucket}"


def _deleted(headers_b64: object) -> bool:
    """Whether a stored message removes its key: the same rule as the watch (`is_delete`)."""
    if not isinstance(headers_b64, str) or not headers_b64:
        return False
    try:
        block = base64.b64decode(headers_b64).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        raise StoreError("stream message headers are not base64") from None
    headers: dict[str, str] = {}
    for line in block.split("\r\n")[1:]:  # the first line is NATS/1.0
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return is_delete(headers)


async def js_request(
    nc: Client,
    subject: str,
    payload: bytes,
    wait: float,
    headers: dict[str, str] | None = None,
    no_responders: str = "JetStream is not available (no responders)",
) -> dict[str, Any]:
    """One JetStream API request, its answer as a JSON object (an `error` in it is left to the
    caller); every way it can fail is a StoreError, so callers fail closed. `wait` only keeps
    nats-py from giving up first: callers bound the whole call with their own deadline."""
    if not nc.is_connected:
        # nats-py would buffer the request until a reconnect: answer now instead.
        raise StoreError("not connected to NATS")
    try:
        msg = await nc.request(subject, payload, timeout=wait, headers=headers)
    except nats.errors.NoRespondersError:
        raise StoreError(no_responders) from None
    except nats.errors.TimeoutError:
        raise StoreError("JetStream did not answer") from None
    except nats.errors.Error as exc:
        raise StoreError(f"NATS error: {type(exc).__name__}") from None
    try:
        doc = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        raise StoreError("JetStream answered with something that is not JSON") from None
    if not isinstance(doc, dict):
        raise StoreError("JetStream answered with something that is not a JSON object")
    return doc


class KVStore:
    """`Store` over a KV bucket. Holds no binding: it works from whenever the bucket exists."""

    def __init__(self, nc: Client, bucket: str = "users", request_timeout: float = 5.0) -> None:
        self._nc = nc
        self.bucket = bucket
        self._api = f"$JS.API.STREAM.MSG.GET.{stream_name(bucket)}"
        self._subject_prefix = f"$KV.{bucket}."
        self._timeout = request_timeout

    async def get(self, key: str) -> bytes | None:
        entry = await self.get_entry(key)
        return None if entry is None else entry[0]

    def get_nowait(self, key: str) -> bytes | None:
        raise WouldBlock  # every answer is a JetStream round trip

    async def get_entry(self, key: str) -> tuple[bytes, int] | None:
        """(value, revision) of `key`, None when it has no live value."""
        request = orjson.dumps({"last_by_subj": self._subject_prefix + key})
        doc = await js_request(self._nc, self._api, request, self._timeout)
        error = doc.get("error")
        if error is not None:
            code = error.get("err_code") if isinstance(error, dict) else None
            if code == _NO_MESSAGE:
                return None
            if code == _STREAM_NOT_FOUND:
                raise StoreError(f"bucket {self.bucket!r} does not exist")
            description = error.get("description", "") if isinstance(error, dict) else ""
            raise StoreError(f"JetStream error {code}: {str(description)[:200]}")
        message = doc.get("message")
        if not isinstance(message, dict):
            raise StoreError("JetStream answer has no message")
        if _deleted(message.get("hdrs")):
            return None
        seq = message.get("seq")
        try:
            value = base64.b64decode(message.get("data") or "")
        except (binascii.Error, ValueError, TypeError):
            raise StoreError("stream message data is not base64") from None
        return value, seq if isinstance(seq, int) else 0


class BucketConfigError(StoreError):
    """A stream of the bucket's name exists but is not the bucket we expect."""


async def bucket_info(nc: Client, bucket: str) -> StreamInfo | None:
    """The bucket's stream, None when it does not exist; an error when JetStream cannot say,
    or when a stream of that name is not a KV bucket."""
    name = stream_name(bucket)
    try:
        info = await nc.jetstream().stream_info(name)
    except nats.js.errors.NotFoundError:
        return None
    except nats.js.errors.ServiceUnavailableError:
        raise StoreError("JetStream is not enabled for this account") from None
    except nats.errors.NoRespondersError:
        raise StoreError("JetStream is not available (no responders)") from None
    except nats.errors.TimeoutError:
        raise StoreError(f"JetStream did not answer for stream {name}") from None
    subjects = list(info.config.subjects or [])
    if subjects != [f"$KV.{bucket}.>"]:
        raise BucketConfigError(
            f"stream {name} exists but is not a KV bucket (subjects {subjects});"
            " pick another --users-bucket"
        )
    return info


async def ensure_bucket(nc: Client, bucket: str, replicas: int | None) -> None:
    """Create the bucket when it is missing (replicas default 1); check it when it exists."""
    info = await bucket_info(nc, bucket)
    if info is None:
        try:
            await nc.jetstream(timeout=CREATE_TIMEOUT).create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=HISTORY,
                    replicas=replicas or 1,
                    storage=StorageType.FILE,
                    description="callout user records (key: user public nkey)",
                )
            )
        except nats.js.errors.APIError as exc:
            raise BucketConfigError(
                f"cannot create bucket {bucket!r}: {exc.description or exc.code}"
            ) from None
        except nats.errors.TimeoutError:
            # The answer to a create may be lost while the stream was made all the same (seen
            # on a cluster just formed): whether the bucket exists is the answer that counts,
            # and the bucket found is checked like any other.
            info = await bucket_info(nc, bucket)
            if info is None:
                raise StoreError(
                    f"JetStream did not confirm creating bucket {bucket!r} in"
                    f" {CREATE_TIMEOUT:g} s, and it does not exist"
                ) from None
        else:
            return
    have = info.config.num_replicas or 1
    if replicas is not None and have != replicas:
        raise BucketConfigError(
            f"bucket {bucket!r} has {have} replica(s), --replicas asks for {replicas};"
            " change it with the nats CLI (nats stream edit) or drop --replicas"
        )


# A write that finds no responders reached no stream, so it is safe to send again. A stream
# has none for a moment when just created (its leader's interest in `$KV.<bucket>.>` is still
# on its way to the node we are connected to), and for an election after its leader died
# (about 5 s in nats-server 2.15). nats.go's JetStream publish retries this case too (twice,
# 250 ms apart); nats-py does not. We keep trying for 10 s: `users` is run by hand, and a
# revocation that waits out an election is better than one the operator must repeat.
_NO_RESPONDERS_RETRIES = 40
_NO_RESPONDERS_WAIT = 0.25


class NoStreamError(StoreError):
    """A write found no stream for as long as we wait: JetStream is down, not one key."""


async def _written(write: Callable[[], Awaitable[object]]) -> bool:
    """Run a conditional KV write: False when its revision check failed."""
    for attempt in range(_NO_RESPONDERS_RETRIES + 1):
        try:
            await write()
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.js.errors.NoStreamResponseError:  # nats-py's name for no responders
            if attempt == _NO_RESPONDERS_RETRIES:
                raise NoStreamError(
                    "no stream answered the write (JetStream is down or electing a leader)"
                ) from None
            await asyncio.sleep(_NO_RESPONDERS_WAIT)
        else:
            return True
    raise AssertionError("unreachable")


async def create_key(kv: KeyValue, key: str, value: bytes) -> bool:
    """Write a new key; False when it already has a live value."""
    return await _written(lambda: kv.create(key, value))


async def update_key(kv: KeyValue, key: str, value: bytes, revision: int) -> bool:
    """Compare-and-set: False when the key changed since `revision` (someone else wrote)."""
    return await _written(lambda: kv.update(key, value, last=revision))


async def create(nc: Client, bucket: str, key: str, value: bytes) -> bool:
    return await create_key(await nc.jetstream().key_value(bucket), key, value)


async def update(nc: Client, bucket: str, key: str, value: bytes, revision: int) -> bool:
    return await update_key(await nc.jetstream().key_value(bucket), key, value, revision)
