"""The shared replay record (`--replay-bucket`): a KV bucket where each replica writes the
requests it answers, so a request replayed to *another* replica is recognised too.

Each request writes two keys, `u.<server id>.<user_nkey>` and `n.<server id>.<nonce>`, with
"create only" semantics (expected last subject sequence 0): the write fails if the key
exists, which is the replay. Entries expire with the bucket's max age, which outlives any
request (a request lives for the server's authorization timeout, at most a minute).
"""

from __future__ import annotations

import asyncio
import re

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType

from callout.store.base import StoreError
from callout.store.kv import BucketConfigError, js_request, stream_name

_WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErr: the key exists
_EXPECT_NEW = {"Nats-Expected-Last-Subject-Sequence": "0"}
# KV keys allow [-/_=.a-zA-Z0-9]; server ids and user keys are base32, nonces base64url.
_KEY_SAFE = re.compile(r"[-_=A-Za-z0-9]+")
TTL = 120.0


class ReplayBucket:
    def __init__(self, nc: Client, bucket: str, request_timeout: float = 5.0) -> None:
        self._nc = nc
        self.bucket = bucket
        self._prefix = f"$KV.{bucket}."
        self._timeout = request_timeout

    async def ensure(self, replicas: int | None) -> None:
        """Create the bucket if it is missing. Not fatal at start: lookups fail closed."""
        js = self._nc.jetstream()
        try:
            await js.stream_info(stream_name(self.bucket))
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    ttl=TTL,
                    replicas=replicas or 1,
                    storage=StorageType.FILE,
                    description="callout replay record (expires entries after 2 minutes)",
                )
            )
        except nats.js.errors.APIError as exc:
            raise BucketConfigError(
                f"cannot create replay bucket {self.bucket!r}: {exc.description or exc.code}"
            ) from None

    async def first_sight(self, server_id: str, user_nkey: str, nonce: str) -> bool:
        keys = [f"u.{server_id}.{user_nkey}"]
        if nonce:
            keys.append(f"n.{server_id}.{nonce}")
        for key in keys:
            if not all(_KEY_SAFE.fullmatch(part) for part in key.split(".")):
                raise StoreError("request fields cannot form a replay key")
        results = await asyncio.gather(*(self._create(key) for key in keys))
        return all(results)

    async def _create(self, key: str) -> bool:
        doc = await js_request(
            self._nc,
            self._prefix + key,
            b"",
            self._timeout,
            headers=_EXPECT_NEW,
            no_responders=f"replay bucket {self.bucket!r} is not available",
        )
        error = doc.get("error")
        if error is None:
            return True
        if isinstance(error, dict) and error.get("err_code") == _WRONG_LAST_SEQUENCE:
            return False
        raise StoreError(f"replay bucket error: {str(error)[:200]}")
