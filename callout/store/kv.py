"""The JetStream KV layer: every read and write callout makes to a KV bucket goes through here.

- one point read (`KVStore`: a key's last message, from the stream leader; or, through a
  leader election, from a replica);
- one scan (`scan`: the last message of every key, in one pass of an ordered consumer, checked
  to reach the stream's end), for `users list`, `users export` and the import plan;
- one conditional write (`put`: stored only if the key's last message is the revision given,
  0 for none), with one retry policy (a write that found no stream is sent again, for as long
  as its caller allows); `create` and `update` are the two uses of it;
- one `ensure_bucket` for both buckets (users, and the shared replay record), with the
  recovery of a create whose answer was lost.

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
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType, StreamInfo

from callout.store.base import TOMBSTONE, StoreError, Tombstone, WouldBlock

# JetStream API error codes (nats-server server/errors.json).
_NO_MESSAGE = 10037  # JSNoMessageFoundErr
_STREAM_NOT_FOUND = 10059  # JSStreamNotFoundErr
_WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErr: the key is not at that revision
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


class NoResponders(StoreError):
    """Nothing answered the request (no stream, or no JetStream): nothing was stored."""


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
        raise NoResponders(no_responders) from None
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

    def get_nowait(self, key: str) -> bytes | None:
        raise WouldBlock  # every answer is a round trip

    async def get(self, key: str) -> bytes | None:
        """The record, `TOMBSTONE` when the key's last message is a delete marker, None when
        the key has no message at all."""
        entry = await self.last(key)
        return None if entry is None else entry[0]

    async def get_entry(self, key: str) -> tuple[bytes, int] | None:
        """(value, revision) of `key`, None when it has no live value."""
        entry = await self.last(key)
        return None if entry is None or entry[0] is TOMBSTONE else entry

    async def last(self, key: str) -> tuple[bytes | Tombstone, int] | None:
        """`key`'s last message: (its value, or `TOMBSTONE` for a delete marker, and its
        revision); None when the key has no message at all."""
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
        seq = message.get("seq")
        revision = seq if isinstance(seq, int) else 0
        if _deleted(message.get("hdrs")):
            return TOMBSTONE, revision
        try:
            value = base64.b64decode(message.get("data") or "")
        except (binascii.Error, ValueError, TypeError):
            raise StoreError("stream message data is not base64") from None
        return value, revision

    async def get_from_a_replica(self, key: str) -> tuple[bytes | None, int] | None:
        """`key`'s last message as whichever replica answers holds it (a direct get, which needs
        the stream's `allow_direct`): (value, or None for a delete, and its stream sequence),
        or None when that replica holds no message for the key. Unlike `get`, this is answered
        while the stream has no leader; the caller judges how current the replica is."""
        if not self._nc.is_connected:
            raise StoreError("not connected to NATS")
        subject = f"$JS.API.DIRECT.GET.{stream_name(self.bucket)}"
        request = orjson.dumps({"last_by_subj": self._subject_prefix + key})
        try:
            msg = await self._nc.request(subject, request, timeout=self._timeout)
        except nats.errors.NoRespondersError:
            raise StoreError("no replica serves direct gets") from None
        except nats.errors.TimeoutError:
            raise StoreError("no replica answered") from None
        except nats.errors.Error as exc:
            raise StoreError(f"NATS error: {type(exc).__name__}") from None
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status is not None:
            raise StoreError(f"direct get answered {status}")
        try:
            seq = int(headers.get("Nats-Sequence", ""))
        except ValueError:
            raise StoreError("direct get answer without a sequence") from None
        return (None if is_delete(headers) else msg.data), seq


class BucketConfigError(StoreError):
    """A stream of the bucket's name exists but is not the bucket we expect."""


@dataclass(frozen=True, slots=True)
class BucketKind:
    """What a bucket of ours is made with, and how errors about it name it."""

    label: str  # "bucket", "replay bucket": how messages name it
    flag: str  # the flag that names it
    history: int
    description: str
    ttl: float | None = None  # seconds an entry lives (None: forever)
    # Any replica answers a direct get: the users cache reads the stream's last message from
    # one to stay available through a leader election.
    direct: bool = False
    # An existing bucket with other replicas than --replicas asks for is an error (the users
    # bucket); otherwise it is used as it is.
    check_replicas: bool = False


USERS = BucketKind(
    label="bucket",
    flag="--users-bucket",
    history=HISTORY,
    description="callout user records (key: user public nkey)",
    direct=True,
    check_replicas=True,
)


async def bucket_info(nc: Client, bucket: str, kind: BucketKind = USERS) -> StreamInfo | None:
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
            f" pick another {kind.flag}"
        )
    return info


async def ensure_bucket(
    nc: Client, bucket: str, replicas: int | None, kind: BucketKind = USERS
) -> None:
    """Create the bucket when it is missing (replicas default 1); check it when it exists."""
    info = await bucket_info(nc, bucket, kind)
    if info is None:
        try:
            await nc.jetstream(timeout=CREATE_TIMEOUT).create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=kind.history,
                    ttl=kind.ttl,
                    replicas=replicas or 1,
                    storage=StorageType.FILE,
                    direct=kind.direct,
                    description=kind.description,
                )
            )
        except nats.js.errors.APIError as exc:
            raise BucketConfigError(
                f"cannot create {kind.label} {bucket!r}: {exc.description or exc.code}"
            ) from None
        except nats.errors.TimeoutError:
            # The answer to a create may be lost while the stream was made all the same (seen
            # on a cluster just formed): whether the bucket exists is the answer that counts,
            # and the bucket found is checked like any other.
            info = await bucket_info(nc, bucket, kind)
            if info is None:
                raise StoreError(
                    f"JetStream did not confirm creating {kind.label} {bucket!r} in"
                    f" {CREATE_TIMEOUT:g} s, and it does not exist"
                ) from None
        else:
            return
    have = info.config.num_replicas or 1
    if kind.check_replicas and replicas is not None and have != replicas:
        raise BucketConfigError(
            f"{kind.label} {bucket!r} has {have} replica(s), --replicas asks for {replicas};"
            " change it with the nats CLI (nats stream edit) or drop --replicas"
        )


# ---------------------------------------------------------------------------------------------
# the conditional write
# ---------------------------------------------------------------------------------------------
# A write that finds no responders reached no stream, so it is safe to send again. A stream
# has none for a moment when just created (its leader's interest in `$KV.<bucket>.>` is still
# on its way to the node we are connected to), and for an election after its leader died
# (about 5 s in nats-server 2.15). nats.go's JetStream publish retries this case too (twice,
# 250 ms apart); nats-py does not. By default a write keeps trying for 10 s: `users` is run by
# hand, and a revocation that waits out an election is better than one the operator must
# repeat. The service's replay record, which answers within a request's deadline, does not.
_NO_RESPONDERS_RETRIES = 40
_NO_RESPONDERS_WAIT = 0.25
_NO_STREAM = "no stream answered the write (JetStream is down or electing a leader)"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"


class NoStreamError(StoreError):
    """A write found no stream for as long as we wait: JetStream is down, not one key."""


async def _written(
    write: Callable[[], Awaitable[bool]],
    retries: int | None = None,
    no_stream: str = _NO_STREAM,
) -> bool:
    """The retry policy: `write` sent again while it finds no responders, `retries` times
    (default `_NO_RESPONDERS_RETRIES`); any other outcome is the caller's, never sent twice."""
    retries = _NO_RESPONDERS_RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return await write()
        except NoResponders:
            if attempt == retries:
                raise NoStreamError(no_stream) from None
            await asyncio.sleep(_NO_RESPONDERS_WAIT)
    raise AssertionError("unreachable")


async def _put_once(
    nc: Client, bucket: str, key: str, value: bytes, revision: int, wait: float
) -> bool:
    """One conditional write: True when stored, False when `key`'s last revision is not
    `revision`; NoResponders when nothing answered, StoreError for anything else."""
    doc = await js_request(
        nc, f"$KV.{bucket}.{key}", value, wait, headers={_EXPECTED_LAST: str(revision)}
    )
    error = doc.get("error")
    if error is None:
        return True
    code = error.get("err_code") if isinstance(error, dict) else None
    if code == _WRONG_LAST_SEQUENCE:
        return False
    description = error.get("description", "") if isinstance(error, dict) else error
    raise StoreError(f"JetStream error {code}: {str(description)[:200]}")


async def put(
    nc: Client,
    bucket: str,
    key: str,
    value: bytes,
    revision: int,
    *,
    wait: float = 5.0,
    retries: int | None = None,
    no_stream: str = _NO_STREAM,
) -> bool:
    """Store `value` under `key` only if the key's last message is `revision` (0: it has
    none): False when it is not. Sent again while no stream answers (`_written`)."""
    return await _written(
        lambda: _put_once(nc, bucket, key, value, revision, wait), retries, no_stream
    )


async def create(nc: Client, bucket: str, key: str, value: bytes) -> bool:
    """Write a new key; False when it already has a live value. A key whose last message
    deletes it is written over that marker (it has no live value)."""
    if await put(nc, bucket, key, value, 0):
        return True
    entry = await KVStore(nc, bucket).last(key)
    if entry is not None and entry[0] is TOMBSTONE:
        return await put(nc, bucket, key, value, entry[1])
    return False


async def update(nc: Client, bucket: str, key: str, value: bytes, revision: int) -> bool:
    """Compare-and-set: False when the key changed since `revision` (someone else wrote)."""
    return await put(nc, bucket, key, value, revision)


# ---------------------------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------------------------
#: What a scan hands over per key: its last message's stream sequence, the key, the message's
#: headers (a delete marker has `is_delete` ones) and its data.
Deliver = Callable[[int, str, Mapping[str, str] | None, bytes], None]


async def scan_messages(
    nc: Client,
    bucket: str,
    deliver: Deliver,
    *,
    until: int | None = None,
    stall: float = 5.0,
) -> bool:
    """The last message of every key of the bucket, delete markers included, to `deliver` in
    stream order, in one pass of an ordered consumer rather than a request per key. It ends
    once the messages reached stream sequence `until` (default: the stream's last as it is
    when the scan starts; 0: the bucket is empty); a message written meanwhile may come too.
    False when the bucket does not exist; a StoreError when nothing arrives for `stall`
    seconds before the end."""
    prefix = f"$KV.{bucket}."
    stream = stream_name(bucket)
    loaded = asyncio.Event()
    progress = asyncio.Event()
    highest = 0

    async def on_message(msg: Msg) -> None:
        nonlocal highest
        meta = msg.metadata
        deliver(meta.sequence.stream, msg.subject[len(prefix) :], msg.headers, msg.data)
        highest = max(highest, meta.sequence.stream)
        progress.set()
        if meta.num_pending == 0:
            loaded.set()

    try:
        if until is None:
            # What the scan must reach: a fresh consumer can report nothing pending before it
            # has caught up (seen on R3 clusters), and the stream's last message always comes.
            state = (await nc.jetstream().stream_info(stream)).state
            if not state.messages:
                # Nothing to read, and no consumer to create: on a stream just made on a busy
                # cluster, creating one can outlast the request timeout.
                return True
            until = state.last_seq
        sub = await nc.jetstream().subscribe(
            prefix + ">",
            stream=stream,
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
    except nats.js.errors.NotFoundError:
        return False
    except nats.errors.TimeoutError:
        raise StoreError(f"JetStream did not answer reading bucket {bucket!r}") from None
    consumer: str | None = None
    try:
        try:
            info = await sub.consumer_info()
        except nats.errors.TimeoutError:
            raise StoreError(f"JetStream did not answer reading bucket {bucket!r}") from None
        consumer = info.name
        if info.num_pending == 0 and sub.delivered == 0:
            loaded.set()  # an empty bucket sends nothing that marks the end
        while not loaded.is_set() or highest < until:
            progress.clear()
            try:
                async with asyncio.timeout(stall):
                    await progress.wait()
            except TimeoutError:
                raise StoreError(f"reading bucket {bucket!r} stalled") from None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if consumer is not None and nc.is_connected:
            # Not left to expire: whoever counts the bucket's consumers sees only its own.
            with contextlib.suppress(Exception):
                await nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}", b"")
    return True


async def scan(
    nc: Client, bucket: str, keep: Callable[[str], bool] | None = None, stall: float = 5.0
) -> dict[str, tuple[bytes, int]]:
    """(value, revision) of every live key of the bucket (those `keep` accepts), in one pass
    (`scan_messages`). Empty when the bucket does not exist."""
    found: dict[str, tuple[bytes, int]] = {}

    def take(seq: int, key: str, headers: Mapping[str, str] | None, data: bytes) -> None:
        if is_delete(headers):
            found.pop(key, None)
        elif keep is None or keep(key):
            found[key] = (data, seq)

    await scan_messages(nc, bucket, take, stall=stall)
    return found


async def entries(nc: Client, bucket: str) -> list[tuple[str, bytes]]:
    """Every live (key, value) of the bucket, sorted by key. Empty when it does not exist."""
    found = await scan(nc, bucket)
    return sorted((key, value) for key, (value, _) in found.items())


class KVBucket:
    """The users bucket as `callout users import` plans and writes it: point reads from the
    stream leader (`KVStore`), one scan, conditional writes."""

    def __init__(self, nc: Client, bucket: str) -> None:
        self._nc = nc
        self._bucket = bucket
        self._store = KVStore(nc, bucket)

    async def get_entry(self, key: str) -> tuple[bytes, int] | None:
        return await self._store.get_entry(key)

    async def size(self) -> int:
        """Messages in the bucket: at least its number of keys, the cost of a `scan`."""
        info = await self._nc.jetstream().stream_info(stream_name(self._bucket))
        return info.state.messages

    async def scan(self, keep: Callable[[str], bool]) -> dict[str, tuple[bytes, int]]:
        return await scan(self._nc, self._bucket, keep)

    async def create(self, key: str, value: bytes) -> bool:
        return await create(self._nc, self._bucket, key, value)

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        return await update(self._nc, self._bucket, key, value, revision)


async def open_bucket(
    nc: Client, bucket: str, *, create: bool, replicas: int | None
) -> KVBucket | None:
    """The users bucket, created when missing if `create`; None when it is missing and not
    created (a dry run writes nothing, not even the bucket)."""
    if create:
        await ensure_bucket(nc, bucket, replicas)
    elif await bucket_info(nc, bucket) is None:
        return None
    return KVBucket(nc, bucket)
