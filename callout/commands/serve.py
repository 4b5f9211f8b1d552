"""`callout serve`: answer auth-callout requests until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from callout import log, observability
from callout.connection import Identity, connect, load_identity
from callout.decision import Authorizer, Policy
from callout.errors import fail
from callout.recording import writer as recording
from callout.revocation import Revoker
from callout.service import CalloutService
from callout.settings import ServeSettings, add_flags, from_args
from callout.store import Store, StoreError
from callout.store import kv as kvstore
from callout.store.seen import SeenRecord
from callout.store.watch import WatchedStore


def build_policy(settings: ServeSettings) -> tuple[Policy, Identity]:
    """The decision policy and the service's identity, every key file read and checked."""
    identity = load_identity(settings.identity, "service identity")
    return settings.policy.policy(), identity


async def _nats_events(
    connection: str, listeners: list[WatchedStore]
) -> dict[str, Callable[..., Awaitable[None]]]:
    async def disconnected() -> None:
        log.warning("nats_disconnected", connection=connection)
        for listener in listeners:
            listener.disconnected()

    async def reconnected() -> None:
        log.info("nats_reconnected", connection=connection)
        for listener in listeners:
            listener.reconnected()

    async def error(exc: Exception) -> None:
        log.warning(
            "nats_error",
            connection=connection,
            exception=type(exc).__name__,
            detail=str(exc)[:200],
        )

    return {"disconnected_cb": disconnected, "reconnected_cb": reconnected, "error_cb": error}


async def _revoker(settings: ServeSettings, policy: Policy) -> Revoker | None:
    """A system-account connection to kick revoked users' sessions, when one is configured."""
    if (system_identity := settings.system_identity) is None:
        log.warning(
            "revocation_new_connections_only",
            detail="no --system-nkey-seed-file / --system-creds: a revoked user keeps its live"
            " connections until its JWT expires",
        )
        return None
    system = load_identity(system_identity, "system identity")
    nc = await connect(settings.nats_url, system, name="callout-revoker", reconnect=True)
    return Revoker(nc, policy.user_ttl, policy)


async def serve(settings: ServeSettings, stop: asyncio.Event | None = None) -> int:
    policy, identity = build_policy(settings)
    recorder: recording.Recorder | None = None
    if settings.record_dir:
        try:
            recorder = recording.Recorder(
                Path(settings.record_dir), policy=policy, max_bytes=settings.record_max_bytes
            )
        except recording.RecordDirError as exc:
            fail(str(exc))
    # The users cache stops answering while the requests' connection is down (a reply decided
    # from memory then could only go out once the copy is confirmed again, or not at all), so
    # it must hear about a drop before anything else can ask it.
    listeners: list[WatchedStore] = []
    nc = await connect(
        settings.nats_url,
        identity,
        name="callout",
        reconnect=True,
        callbacks=await _nats_events("requests", listeners),
    )
    # The store (the users cache, direct lookups, the replay record) gets a connection of its
    # own. On the requests' connection its answers would queue behind every request the
    # server has sent us (one TCP stream, in order): in a connect storm a probe of the users
    # stream waits for our whole backlog, which reads as JetStream stalling, and the cache
    # goes dark exactly when it is needed. (The cache's watch and probes have a third, on
    # their own thread: callout/store/watch.py.)
    store_nc = await connect(
        settings.nats_url,
        identity,
        name="callout-store",
        reconnect=True,
        callbacks=await _nats_events("store", []),
    )
    # The shell's deadline bounds every lookup; this only stops nats-py giving up first.
    timeout = max(policy.backend_timeout, 1.0)
    direct = kvstore.KVStore(store_nc, settings.users_bucket, request_timeout=timeout)
    store: Store = direct
    revoker = await _revoker(settings, policy)
    watched: WatchedStore | None = None
    # Live revocation needs the watch even when lookups do not use it.
    if settings.users_cache == "watch" or revoker is not None:

        def watch_connection(
            callbacks: dict[str, Callable[..., Awaitable[None]]],
        ) -> Awaitable[Client]:
            # The watch's own connection, on its own thread: see callout/store/watch.py.
            return connect(
                settings.nats_url,
                identity,
                name="callout-users-watch",
                reconnect=True,
                callbacks=callbacks,
            )

        watched = WatchedStore(
            store_nc, settings.users_bucket, connect=watch_connection, direct=direct
        )
        listeners.append(watched)
        if revoker is not None:
            watched.listeners.append(revoker.record_changed)
            watched.load_listeners.append(revoker.loaded)
        watched.start()
        if settings.users_cache == "watch":
            store = watched
    seen: SeenRecord | None = None
    if settings.replay_bucket:
        seen = SeenRecord(store_nc, settings.replay_bucket, request_timeout=timeout)
        try:
            await seen.ensure(settings.replicas)
        except StoreError as exc:  # fail closed at lookup time; the service still starts
            log.warning("replay_bucket_unavailable", bucket=settings.replay_bucket, detail=str(exc))
    service = CalloutService(
        nc,
        Authorizer(policy),
        store,
        queue=settings.queue_group,
        max_inflight=settings.max_inflight,
        max_backlog=settings.max_backlog,
        seen=seen,
        recorder=recorder,
        log_decisions=settings.log_decisions,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if revoker is not None:
        service.observers.append(revoker.observe)
    await service.start()
    ops = await observability.start(
        nc, service, store, settings.observability, probe_timeout=policy.backend_timeout
    )
    # Tell the operator now, not at the first denied user, that the store is not there.
    # The service serves on regardless: internal keys do not need the store.
    try:
        async with asyncio.timeout(policy.backend_timeout):
            await direct.get(identity.key.public)
    except (StoreError, TimeoutError) as exc:
        log.warning("store_unavailable", bucket=settings.users_bucket, detail=str(exc) or "timeout")
    await stop.wait()
    log.info("stopping", inflight=service.inflight)
    # Answer everything in flight first; then the rest, each step on its own, so one that
    # fails (a flush timing out on a dying connection) neither skips the others nor turns a
    # clean stop into a crash.
    await service.stop()
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if recorder is not None:
        steps.append(("recorder", recorder.close))
    # After the service: the decisions of the requests it finished are audited and counted.
    steps.append(("operations", ops.stop))
    if watched is not None:
        steps.append(("users_cache", watched.stop))
    if revoker is not None:
        steps += [("revoker", revoker.stop), ("revoker_connection", revoker.system.close)]
    for name, step in steps:
        try:
            async with asyncio.timeout(10):
                await step()
        except Exception as exc:
            log.warning("stop_step_failed", step=name, exception=type(exc).__name__)
    for connection in (nc, store_nc):
        try:
            async with asyncio.timeout(5):
                await connection.drain()
        except Exception:
            with contextlib.suppress(Exception):
                await connection.close()
    log.info("stopped", **vars(service.stats))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer auth-callout requests")
    add_flags(p, ServeSettings)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = from_args(ServeSettings, args)
    log.setup(settings.log_level, settings.log_format)
    return run_loop(serve(settings), settings.event_loop)


def run_loop(coro: Coroutine[Any, Any, int], event_loop: str) -> int:
    if event_loop == "uvloop":
        try:
            import uvloop  # a dependency, except where it has no wheels (Windows)
        except ImportError:
            coro.close()
            fail("--event-loop uvloop: uvloop is not installed (use asyncio)")
        return int(uvloop.run(coro))
    return asyncio.run(coro)
