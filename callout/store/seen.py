"""The shared replay record (`--replay-bucket`): a KV bucket where each replica writes the
requests it answers, so a request replayed to *another* replica is recognised too.

Each request writes two keys, `u.<server id>.<user_nkey>` and `n.<server id>.<nonce>`, with
"create only" semantics (the store layer's conditional write at revision 0): the write fails
if the key exists, which is the replay. A write is not sent again when no stream answers: the
request's deadline is short, and a missing bucket must be a deny at once. Entries expire with
the bucket's max age, which outlives any request (a request lives for the server's
authorization timeout, at most a minute).
"""

from __future__ import annotations

import asyncio
import re

from nats.aio.client import Client

from callout.store.base import StoreError
from callout.store.kv import BucketKind, ensure_bucket, put

# KV keys allow [-/_=.a-zA-Z0-9]; server ids and user keys are base32, nonces base64url.
_KEY_SAFE = re.compile(r"[-_=A-Za-z0-9]+")
TTL = 120.0

SEEN = BucketKind(
    label="replay bucket",
    flag="--replay-bucket",
    history=1,
    ttl=TTL,
    description="callout replay record (expires entries after 2 minutes)",
)


class SeenRecord:
    """The requests any replica has answered, as far as the bucket remembers them."""

    def __init__(self, nc: Client, bucket: str, request_timeout: float = 5.0) -> None:
        self._nc = nc
        self.bucket = bucket
        self._timeout = request_timeout

    async def ensure(self, replicas: int | None) -> None:
        """Create the bucket if it is missing. Not fatal at start: lookups fail closed."""
        await ensure_bucket(self._nc, self.bucket, replicas, SEEN)

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
        return await put(
            self._nc,
            self.bucket,
            key,
            b"",
            0,
            wait=self._timeout,
            retries=0,
            no_stream=f"replay bucket {self.bucket!r} is not available",
        )
