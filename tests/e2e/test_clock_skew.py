"""The service's clock skewed against its server's, both ways, by 1.5 s and by 3 s (the
service runs under `faketime`, its monotonic clock left alone), with the server's
`authorization.timeout` at 1 s and at the default 2 s: known users are admitted and unknown
ones denied with the service's reason, every time.

The lookup deadline is measured from the local receive time plus the span the request states
(`exp - iat`), never by comparing the server's whole-second `exp` with the service's own clock
(a host ahead of its server would then time lookups out at once, `store_timeout` for a known
user, and, more than a second past `exp`, drop requests as expired while the client waits out
the server's timeout); a request is dropped as expired only far past any skew. A host behind
its server has its deadline fall to `--backend-timeout`: both directions are tested.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest

from tests.support.admission import SERVICE_ERROR
from tests.support.nats import (
    Keys,
    ServerFactory,
    auth_errors,
    nats_connect,
    new_user,
    next_event,
    raw_connect,
)
from tests.support.service import record, seed_files, serve_args, spawn, users_bucket

# Debian's faketime package: the library itself, preloaded into the service process. (Its
# `faketime` wrapper runs the program as a child it does not pass signals to, so stopping the
# wrapper would leave the service running.) The multi-threaded build: the service has threads.
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)
CONNECTS = 5

pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="faketime not installed")


@pytest.mark.parametrize("timeout", [1.0, 2.0], ids=["timeout-1s", "timeout-2s"])
@pytest.mark.parametrize("skew", ["+1.5s", "-1.5s", "+3s", "-3s"])
async def test_a_skewed_service_clock_still_answers_in_time(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path, skew: str, timeout: float
) -> None:
    assert LIBFAKETIME is not None
    server = nats_server(auth_timeout=timeout)
    files = seed_files(keys, tmp_path / "keys")
    admin = await nats_connect(server.url, keys.service_seed)
    events = await auth_errors(admin)
    kv = await users_bucket(admin)
    known_seed, known = new_user()
    await kv.put(known, record("known"))
    service = spawn(
        serve_args(server, files),
        env={"LD_PRELOAD": LIBFAKETIME, "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
    )
    try:
        live = await service.await_event("users_cache_live", users=1)
        # The service's clock really is off by the skew (its log stamps are its clock).
        offset = float(skew.removesuffix("s"))
        assert abs(live["ts"] - time.time() - offset) < 0.75
        for _ in range(CONNECTS):
            admitted = await raw_connect(server.url, known_seed)
            assert admitted.admitted, admitted.error
        for _ in range(CONNECTS):
            stranger_seed, stranger = new_user()
            assert not (await raw_connect(server.url, stranger_seed)).admitted
            event = await next_event(events, lambda e, s=stranger: e["client"]["user"] == s)
            assert event["reason"] == SERVICE_ERROR + "unknown_user"
        reasons = {d["reason"] for d in service.events("decision")}
        assert reasons == {"admit", "unknown_user"}
    finally:
        service.terminate()
        await admin.close()
