"""The set-up most fault scenarios share: a server, the users bucket with a known and a revoked
user, `callout serve` as a real process (so it can be killed, and runs exactly as deployed: the
users cache, the reconnect settings, the signal handling), and a `Witness` for the reasons."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from tests.support.nats import Keys, NatsServer, nats_connect, new_user
from tests.support.service import Subprocess, record, seed_files, serve_args, spawn, users_bucket
from tests.support.wait import eventually
from tests.support.witness import BACKEND_TIMEOUT, Users, Witness

#: Every attempt goes through the store: with the failure limiter on, the revoked user would
#: be denied `throttled` without a lookup after a few attempts, and every test client comes
#: from 127.0.0.1 (one host), so the host limit would soon throttle the known user too. The
#: limiter has its own test (test_limiter.py).
FAULT_FLAGS = (
    "--backend-timeout", str(BACKEND_TIMEOUT),
    "--fail-limit-key", "0",
    "--fail-limit-host", "0",
)  # fmt: skip


@dataclass
class Rig:
    server: NatsServer
    keys: Keys
    files: dict[str, Path]
    admin: Client  # an AUTH-account connection: writes the bucket
    witness: Witness
    users: Users
    svc: Subprocess | None = None

    async def known_users(self, n: int) -> list[tuple[str, str]]:
        """`n` more users with an admin record each (named k0, k1, ...): `(seed, public key)`."""
        kv = await users_bucket(self.admin)
        users = [new_user() for _ in range(n)]
        for i, (_, pub) in enumerate(users):
            await kv.put(pub, record(f"k{i}", admin=True))
        return users

    async def put_users(self) -> None:
        kv = await users_bucket(self.admin)
        await kv.put(self.users.known[1], record("known", admin=True))
        await kv.put(self.users.revoked[1], record("revoked", admin=True, revoked=True))

    async def serve(self, *extra: str, url: str | None = None) -> Subprocess:
        self.svc = spawn(serve_args(url or self.server.url, self.files, *FAULT_FLAGS, *extra))
        await self.svc.await_event("ready")
        return self.svc


@contextlib.asynccontextmanager
async def rig(
    server: NatsServer,
    keys: Keys,
    tmp_path: Path,
    *,
    serve: Sequence[str] | None = (),
    url: str | None = None,
    reconnect: bool = False,
    **connect: Any,
) -> AsyncIterator[Rig]:
    """`serve`: extra `callout serve` flags, or None to start no service. `url`: where the
    service connects (a proxy). `reconnect`: the admin and witness connections survive a
    server restart."""
    options: dict[str, Any] = dict(connect)
    if reconnect:
        options |= {"allow_reconnect": True, "max_reconnect_attempts": -1,
                    "reconnect_time_wait": 0.1}  # fmt: skip
    admin = await nats_connect(server.url, keys.service_seed, **options)
    witness = await Witness.open(server.url, keys, **options)
    r = Rig(server, keys, seed_files(keys, tmp_path / "keys"), admin, witness, Users())
    try:
        await r.put_users()
        if serve is not None:
            await r.serve(*serve, url=url)
            assert r.svc is not None
            if "--users-cache" not in serve:
                # Both users loaded: lookups are answered from memory from now on.
                await r.svc.await_event("users_cache_live", users=2)
        yield r
    finally:
        if r.svc is not None:
            r.svc.kill()
        await witness.close()
        with contextlib.suppress(Exception):
            await admin.close()


#: The contract: denied within 100 ms of losing the store.
BOUND = 0.1


#: Known-user loops running at once: under a storm each attempt takes long, so more loops.
KNOWN_LOOPS = {False: 4, True: 24}


@contextlib.asynccontextmanager
async def storm(
    admin: Client, svc: Subprocess | None, url: str, tmp_path: Path, on: bool
) -> AsyncIterator[None]:
    """`IN_FLIGHT` connects at a time to `url` by admitted users, for as long as the block
    runs; `svc` is the service they reach."""
    if not on:
        yield
        return
    assert svc is not None
    kv = await users_bucket(admin)
    seeds = []
    for i in range(STORM_USERS):
        seed, pub = new_user()
        await kv.put(pub, record(f"storm{i}", admin=True))
        seeds.append(seed)
    seed_file = tmp_path / "storm-seeds.txt"
    seed_file.write_text("\n".join(seeds) + "\n")
    before = len(svc.lines)
    load = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen",
        "--url", url,
        "--seed-file", str(seed_file),
        "--connects", "100000000",
        "--concurrency", str(IN_FLIGHT),
        "--timeout", "10",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Under way: the service has decided a thousand of the storm's connects.
        await eventually(lambda: len(svc.lines) - before > 1000, 30)
        yield
        assert load.returncode is None, "the storm ended before the measurement did"
    finally:
        with contextlib.suppress(ProcessLookupError):
            load.kill()
        await load.wait()


#: Connects the storm keeps in flight.
IN_FLIGHT = 2000


#: The storm's own users (admitted, from the cache).
STORM_USERS = 50
