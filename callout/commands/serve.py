"""`callout serve`: answer auth-callout requests until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from nats.aio.client import Client

from callout import log, observability, recording
from callout.commands.common import (
    Identity,
    add_identity_flags,
    connect,
    fail,
    identity_from_args,
    permissions_json,
    user_key,
)
from callout.config import (
    add,
    bounded_seconds,
    non_negative_int,
    positive_float,
    positive_int,
    replicas,
)
from callout.decision import CLIENT_KINDS, AccountSigner, Authorizer, Policy
from callout.keys import (
    CurveKey,
    KeyError_,
    KeyKind,
    SigningKey,
    decode_public,
    load_curve_key,
    load_signing_key,
)
from callout.records import account_problem
from callout.revocation import Revoker
from callout.service import LOG_DECISIONS, CalloutService
from callout.store import Store, StoreError
from callout.store import kv as kvstore
from callout.store.replay import ReplayBucket
from callout.store.watch import WatchedStore

# A JWT living longer than this is a mistake (and past int64 seconds, one every admit fails on).
MAX_USER_TTL = 10 * 366 * 86400.0
# A window longer than a day makes a throttled key or host wait a day to recover.
MAX_FAIL_WINDOW = 86400.0


def kinds_from_flag(values: list[str] | None) -> frozenset[str]:
    """--allow-kind client,leafnode (repeatable, commas allowed)."""
    kinds = frozenset(CLIENT_KINDS.values())
    chosen = [item.strip() for value in values or ["client"] for item in value.split(",")]
    for item in chosen:
        if item not in kinds:
            fail(f"--allow-kind {item!r}: must be one of {', '.join(sorted(kinds))}")
    return frozenset(chosen)


def signers_from_args(args: argparse.Namespace, *, seeds: bool = True) -> dict[str, AccountSigner]:
    """--account-signer NAME:ACCOUNT_PUBKEY:SEEDFILE, operator mode only. With `seeds=False`
    (replay, which signs nothing) the SEEDFILE may be left out: a stand-in key is used."""
    signers: dict[str, AccountSigner] = {}
    for spec in args.account_signer or []:
        name, _, rest = spec.partition(":")
        account, _, path = rest.partition(":")
        if not (name and account and (path or not seeds)):
            fail(f"--account-signer {spec!r}: expected NAME:ACCOUNT_PUBKEY:SEEDFILE")
        try:
            decode_public(account, KeyKind.ACCOUNT)
        except KeyError_ as exc:
            fail(f"--account-signer {name}: {exc}")
        key = (
            load_signing_key(path, KeyKind.ACCOUNT, f"--account-signer {name}")
            if path
            else SigningKey.generate(KeyKind.ACCOUNT)
        )
        signers[name] = AccountSigner(key, account)
    return signers


def build_policy(args: argparse.Namespace) -> tuple[Policy, Identity]:
    identity = identity_from_args(args, "service identity")
    return policy_from_args(args), identity


def policy_from_args(args: argparse.Namespace, issuer: SigningKey | None = None) -> Policy:
    """The decision policy from the flags `add_policy_flags` defines (serve and replay)."""
    if issuer is None:
        issuer = load_signing_key(
            args.issuer_seed_file, KeyKind.ACCOUNT, "issuer (--issuer-seed-file)"
        )
    xkeys: tuple[CurveKey, ...] = tuple(load_curve_key(p) for p in args.xkey_seed_file or [])
    for name, flag in ((args.account, "--account"), (args.callout_account, "--callout-account")):
        if (problem := account_problem(name)) is not None:
            fail(f"{flag} {problem}")
    allowed = frozenset(args.allowed_account or [args.account])
    forbidden = forbidden_accounts(args.system_account, args.callout_account)
    if problem := placement_problem(args.account, allowed, forbidden):
        fail(problem)
    for name in allowed:
        if (problem := account_problem(name)) is not None:
            fail(f"--allowed-account {problem}")
    if args.backend_timeout <= 0:
        fail("--backend-timeout must be > 0")
    signers = signers_from_args(args)
    forbidden_keys: frozenset[str] = frozenset()
    if args.operator:
        if missing := sorted((allowed | {args.account}) - signers.keys()):
            fail(f"operator mode: no --account-signer for account(s) {', '.join(missing)}")
        if args.issuer_account:
            try:
                decode_public(args.issuer_account, KeyKind.ACCOUNT)
            except KeyError_ as exc:
                fail(f"--issuer-account: {exc}")
        # Placement is by the signing account's key here, not by name, so the name check on
        # --allowed-account does not keep users out of the callout account: this does.
        callout_keys = {issuer.public, args.issuer_account or issuer.public}
        for name, signer in signers.items():
            if signer.account in callout_keys or signer.key.public in callout_keys:
                fail(
                    f"--account-signer {name}: that is the callout account's key; users are"
                    " never placed in the callout account"
                )
        # Placement is by key here: the system account is known by its key, or not at all.
        try:
            decode_public(args.system_account, KeyKind.ACCOUNT)
        except KeyError_:
            fail(
                "operator mode: --system-account must be the system account's public key"
                " (A..., the server's `system_account`), so no --account-signer can place"
                " users in it"
            )
        forbidden_keys = frozenset({args.system_account})
        for name, signer in signers.items():
            if signer.account in forbidden_keys:
                fail(
                    f"--account-signer {name}: that is the system account's key; users are"
                    " never placed in the system account"
                )
    elif signers or args.issuer_account:
        fail("--account-signer and --issuer-account are for operator mode (--operator)")
    return Policy(
        issuer=issuer,
        account=args.account,
        allowed_accounts=allowed,
        xkeys=xkeys,
        internal_keys=tuple(user_key(k) for k in args.internal_key or []),
        internal_permissions=permissions_json(args.internal_permissions, "--internal-permissions"),
        default_permissions=permissions_json(args.default_permissions, "--default-permissions"),
        mode=args.mode,
        user_ttl=args.user_ttl,
        backend_timeout=args.backend_timeout,
        forbidden_accounts=forbidden,
        signers=signers,
        issuer_account=args.issuer_account or None,
        fail_limit_key=args.fail_limit_key,
        fail_limit_host=args.fail_limit_host,
        fail_window=args.fail_window,
        forbidden_account_keys=forbidden_keys,
        allowed_kinds=kinds_from_flag(args.allow_kind),
    )


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


async def _revoker(args: argparse.Namespace, policy: Policy) -> Revoker | None:
    """A system-account connection to kick revoked users' sessions, when one is configured."""
    if not (args.system_nkey_seed_file or args.system_creds):
        log.warning(
            "revocation_new_connections_only",
            detail="no --system-nkey-seed-file / --system-creds: a revoked user keeps its live"
            " connections until its JWT expires",
        )
        return None
    system = identity_from_args(
        argparse.Namespace(
            nkey_seed_file=args.system_nkey_seed_file,
            creds=args.system_creds,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ),
        "system identity",
    )
    nc = await connect(args.nats_url, system, name="callout-revoker", reconnect=True)
    return Revoker(nc, policy.user_ttl, policy)


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    policy, identity = build_policy(args)
    recorder: recording.Recorder | None = None
    if args.record_dir:
        try:
            recorder = recording.Recorder(
                Path(args.record_dir), policy=policy, max_bytes=args.record_max_bytes
            )
        except recording.RecordDirError as exc:
            fail(str(exc))
    # The users cache stops answering while the requests' connection is down (a reply decided
    # from memory then could only go out once the copy is confirmed again, or not at all), so
    # it must hear about a drop before anything else can ask it.
    listeners: list[WatchedStore] = []
    nc = await connect(
        args.nats_url,
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
        args.nats_url,
        identity,
        name="callout-store",
        reconnect=True,
        callbacks=await _nats_events("store", []),
    )
    # The shell's deadline bounds every lookup; this only stops nats-py giving up first.
    timeout = max(policy.backend_timeout, 1.0)
    direct = kvstore.KVStore(store_nc, args.users_bucket, request_timeout=timeout)
    store: Store = direct
    revoker = await _revoker(args, policy)
    watched: WatchedStore | None = None
    # Live revocation needs the watch even when lookups do not use it.
    if args.users_cache == "watch" or revoker is not None:

        def watch_connection(
            callbacks: dict[str, Callable[..., Awaitable[None]]],
        ) -> Awaitable[Client]:
            # The watch's own connection, on its own thread: see callout/store/watch.py.
            return connect(
                args.nats_url,
                identity,
                name="callout-users-watch",
                reconnect=True,
                callbacks=callbacks,
            )

        watched = WatchedStore(store_nc, args.users_bucket, connect=watch_connection, direct=direct)
        listeners.append(watched)
        if revoker is not None:
            watched.listeners.append(revoker.record_changed)
            watched.load_listeners.append(revoker.loaded)
        watched.start()
        if args.users_cache == "watch":
            store = watched
    replay: ReplayBucket | None = None
    if args.replay_bucket:
        replay = ReplayBucket(store_nc, args.replay_bucket, request_timeout=timeout)
        try:
            await replay.ensure(args.replicas)
        except StoreError as exc:  # fail closed at lookup time; the service still starts
            log.warning("replay_bucket_unavailable", bucket=args.replay_bucket, detail=str(exc))
    service = CalloutService(
        nc,
        Authorizer(policy),
        store,
        queue=args.queue_group,
        max_inflight=args.max_inflight,
        max_backlog=args.max_backlog,
        replay=replay,
        recorder=recorder,
        log_decisions=args.log_decisions,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if revoker is not None:
        service.observers.append(revoker.observe)
    await service.start()
    ops = await observability.start(nc, service, store, args)
    # Tell the operator now, not at the first denied user, that the store is not there.
    # The service serves on regardless: internal keys do not need the store.
    try:
        async with asyncio.timeout(policy.backend_timeout):
            await direct.get(identity.key.public)
    except (StoreError, TimeoutError) as exc:
        log.warning("store_unavailable", bucket=args.users_bucket, detail=str(exc) or "timeout")
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


# What `serve` assumes for a policy flag not given (`callout replay` reads recordings of format
# 1, which carry no policy, with the same).
POLICY_DEFAULTS: Final[dict[str, Any]] = {
    "mode": "enforce",
    "backend_timeout": 1.0,
    "user_ttl": 86400.0,
    "callout_account": "AUTH",
    "system_account": "SYS",
    "fail_limit_key": 10,
    "fail_limit_host": 100,
    "fail_window": 10.0,
    "operator": False,
}


def forbidden_accounts(system_account: str, callout_account: str) -> frozenset[str]:
    """Never placed into, whatever --allowed-account says."""
    return frozenset({"SYS", "$SYS", system_account, callout_account})


def placement_problem(account: str, allowed: frozenset[str], forbidden: frozenset[str]) -> str:
    """Why this --account / --allowed-account set is refused ("" when it is not)."""
    # --account places internal keys and soft-mode admits: it obeys the same rule.
    if bad := sorted((allowed | {account}) & forbidden):
        return (
            f"refusing to place users in {', '.join(bad)}: the system and callout accounts"
            " are never allowed (--allowed-account / --account)"
        )
    return ""


def add_policy_flags(p: argparse.ArgumentParser, *, replay: bool = False) -> None:
    """The flags `policy_from_args` reads. `callout replay` takes them too (`replay=True`):
    there none is required and none has a default (None: not given), since each one given
    overrides its part of a recorded policy."""

    def default(name: str) -> Any:
        return None if replay else POLICY_DEFAULTS[name]

    add(
        p,
        "--issuer-seed-file",
        required=not replay,
        help="auth_callout.issuer account seed (SA...)",
    )
    add(p, "--xkey-seed-file", action="append", help="auth_callout xkey seed (SX...); repeatable")
    add(p, "--account", required=not replay, help="account users are placed in by default")
    add(p, "--internal-key", action="append", help="user key admitted without the store")
    add(p, "--internal-permissions", help="JSON permissions for internal keys (default: none)")
    add(
        p,
        "--mode",
        choices=["enforce", "soft"],
        default=default("mode"),
        help="soft admits unknown",
    )
    add(p, "--default-permissions", help="JSON permissions for soft-mode admits (default: none)")
    add(
        p,
        "--backend-timeout",
        type=positive_float,
        default=default("backend_timeout"),
        help="store deadline, seconds",
    )
    add(
        p,
        "--user-ttl",
        type=bounded_seconds(0, MAX_USER_TTL, zero=True),
        default=default("user_ttl"),
        help="user JWT life, seconds (0: none; at most 10 years)",
    )
    add(
        p,
        "--allowed-account",
        action="append",
        help="accounts records may name (default --account)",
    )
    add(
        p,
        "--operator",
        action="store_true",
        default=default("operator"),
        help="operator (decentralized) mode",
    )
    add(
        p,
        "--issuer-account",
        help="operator mode: callout account key, if the issuer is a signing key",
    )
    add(
        p,
        "--account-signer",
        action="append",
        metavar="NAME:ACCOUNT_PUBKEY:SEEDFILE",
        help="operator mode: the key that signs users of account NAME; repeatable",
    )
    add(
        p,
        "--callout-account",
        default=default("callout_account"),
        help="auth_callout.account; never placed into",
    )
    add(
        p,
        "--system-account",
        default=default("system_account"),
        help="the system account (operator mode: its public key); never placed into",
    )
    add(
        p,
        "--fail-limit-key",
        type=non_negative_int,
        default=default("fail_limit_key"),
        help="failures per key per window",
    )
    add(
        p,
        "--fail-limit-host",
        type=non_negative_int,
        default=default("fail_limit_host"),
        help="failures per host",
    )
    add(
        p,
        "--fail-window",
        type=bounded_seconds(0, MAX_FAIL_WINDOW),
        default=default("fail_window"),
        help="failure window, seconds (at most a day)",
    )
    add(
        p,
        "--allow-kind",
        action="append",
        metavar="KIND[,KIND]",
        help="connection kinds admitted: client, leafnode (default: client); repeatable",
    )


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer auth-callout requests")
    add(p, "--nats-url", required=True, help="NATS server URL(s), comma-separated")
    add_identity_flags(p, "the service's identity (an auth_users member)")
    add_policy_flags(p)
    add(p, "--users-bucket", default="users", help="JetStream KV bucket of user records")
    add(
        p,
        "--users-cache",
        choices=["watch", "off"],
        default="watch",
        help="watch: answer from a watched copy of the bucket while it is provably current",
    )
    add(p, "--system-nkey-seed-file", help="a system-account user seed: kicks revoked sessions")
    add(p, "--system-creds", help="a system-account .creds file: kicks revoked sessions")
    add(p, "--queue-group", default="callout", help="queue group shared by replicas")
    add(p, "--max-inflight", type=positive_int, default=256, help="requests handled at once")
    add(p, "--max-backlog", type=positive_int, default=20_000, help="requests allowed to wait")
    add(p, "--replay-bucket", help="KV bucket shared by replicas to recognise replayed requests")
    add(p, "--replicas", type=replicas, default=None, help="replicas for a replay bucket we create")
    add(p, "--record-dir", help="write every request and its decision here, for callout replay")
    add(
        p,
        "--record-max-bytes",
        type=observability.byte_size,
        default=recording.DEFAULT_MAX_BYTES,
        help="start a new recording file past this size (e.g. 64MiB)",
    )
    add(
        p,
        "--event-loop",
        choices=["asyncio", "uvloop"],
        default="uvloop",
        help="uvloop (the default: less CPU per authorization, bench/README.md) or asyncio",
    )
    add(p, "--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add(
        p,
        "--log-decisions",
        default="all",
        choices=list(LOG_DECISIONS),
        help="which decisions get an info line: all, deny (denies and drops), none",
    )
    add(p, "--log-format", default="json", choices=["json", "console"])
    observability.register_flags(p)
    p.set_defaults(run=lambda a: serve(a), logs=True)
