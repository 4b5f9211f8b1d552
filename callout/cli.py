"""`callout` command line: serve, users, keys, dev, connect.

Every mistake a user can make (a missing seed file, a key of the wrong kind, NATS not
reachable, a bucket with the wrong config, an invalid key or subject) ends in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import nats
import nats.errors
import orjson
from nats.aio.client import Client

from callout import __version__, log
from callout.config import add, non_negative_float, positive_float, positive_int, replicas
from callout.decision import Authorizer, Policy
from callout.keys import (
    CurveKey,
    KeyError_,
    KeyKind,
    SeedFileError,
    SigningKey,
    decode_public,
    load_curve_key,
    load_signing_key,
    write_secret,
)
from callout.records import (
    Permissions,
    RecordError,
    Rules,
    UserRecord,
    account_problem,
    dump_record,
    parse_permissions,
    subject_problem,
)
from callout.service import CalloutService
from callout.store import StoreError
from callout.store import kv as kvstore


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


# --- shared helpers ------------------------------------------------------------------------------
def _urls(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def user_key(text: str) -> str:
    """Keys are case-insensitive on input and stored upper-case."""
    key = text.strip().upper()
    try:
        decode_public(key, KeyKind.USER)
    except KeyError_ as exc:
        fail(f"invalid user public key {text[:60]!r}: {exc}")
    return key


async def connect(
    urls: str,
    seed: SigningKey | None,
    *,
    name: str,
    reconnect: bool,
    callbacks: dict[str, Callable[..., Awaitable[None]]] | None = None,
) -> Client:
    """Connect, or fail with one line. The first connect tries each server twice and gives up
    (nats-py would otherwise retry forever); after it succeeds, a reconnecting client
    (`reconnect=True`) keeps trying for as long as the process runs."""
    callbacks = dict(callbacks or {})
    connected = False
    report = callbacks.pop("error_cb", None)
    attempts: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        # Connection attempts before the first success are summed up by the one-line error.
        if not connected:
            attempts.append(exc)
        elif report is not None:
            await report(exc)

    options: dict[str, Any] = {
        "servers": _urls(urls),
        "name": name,
        "connect_timeout": 3,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        **callbacks,
    }
    if seed is not None:
        options["nkeys_seed_str"] = seed.seed
    try:
        nc = await nats.connect(**options)
    except nats.errors.NoServersError:
        last = f": {_describe(attempts[-1])}" if attempts else ""
        fail(f"cannot connect to NATS at {urls}{last}")
    except nats.errors.Error as exc:
        fail(f"cannot connect to NATS at {urls}: {_describe(exc)}")
    except OSError as exc:
        fail(f"cannot connect to NATS at {urls}: {_describe(exc)}")
    connected = True
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1
    return nc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip() or type(exc).__name__


def _permissions_json(text: str | None, flag: str) -> Permissions:
    if not text:
        return Permissions()
    try:
        return parse_permissions(orjson.loads(text), flag)
    except orjson.JSONDecodeError:
        fail(f"{flag} is not JSON")
    except RecordError as exc:
        fail(str(exc))


# --- serve ---------------------------------------------------------------------------------------
def build_policy(args: argparse.Namespace) -> tuple[Policy, SigningKey]:
    service_key = load_signing_key(args.nkey_seed_file, KeyKind.USER, "service (--nkey-seed-file)")
    issuer = load_signing_key(args.issuer_seed_file, KeyKind.ACCOUNT, "issuer (--issuer-seed-file)")
    xkeys: tuple[CurveKey, ...] = tuple(load_curve_key(p) for p in args.xkey_seed_file or [])
    for name, flag in ((args.account, "--account"), (args.callout_account, "--callout-account")):
        if (problem := account_problem(name)) is not None:
            fail(f"{flag} {problem}")
    allowed = frozenset(args.allowed_account or [args.account])
    forbidden = frozenset({"SYS", "$SYS", args.system_account, args.callout_account})
    if bad := sorted(allowed & forbidden):
        fail(
            f"refusing to place users in {', '.join(bad)}: the system and callout accounts"
            " are never allowed (--allowed-account / --account)"
        )
    for name in allowed:
        if (problem := account_problem(name)) is not None:
            fail(f"--allowed-account {problem}")
    if args.backend_timeout <= 0:
        fail("--backend-timeout must be > 0")
    policy = Policy(
        issuer=issuer,
        account=args.account,
        allowed_accounts=allowed,
        xkeys=xkeys,
        internal_keys=tuple(user_key(k) for k in args.internal_key or []),
        internal_permissions=_permissions_json(args.internal_permissions, "--internal-permissions"),
        default_permissions=_permissions_json(args.default_permissions, "--default-permissions"),
        mode=args.mode,
        user_ttl=args.user_ttl,
        backend_timeout=args.backend_timeout,
        forbidden_accounts=forbidden,
    )
    return policy, service_key


async def _nats_events() -> dict[str, Callable[..., Awaitable[None]]]:
    async def disconnected() -> None:
        log.warning("nats_disconnected")

    async def reconnected() -> None:
        log.info("nats_reconnected")

    async def error(exc: Exception) -> None:
        log.warning("nats_error", exception=type(exc).__name__, detail=str(exc)[:200])

    return {"disconnected_cb": disconnected, "reconnected_cb": reconnected, "error_cb": error}


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    policy, service_key = build_policy(args)
    nc = await connect(
        args.nats_url, service_key, name="callout", reconnect=True, callbacks=await _nats_events()
    )
    store = kvstore.KVStore(nc, args.users_bucket, request_timeout=max(policy.backend_timeout, 1.0))
    service = CalloutService(
        nc, Authorizer(policy), store, queue=args.queue_group, max_inflight=args.max_inflight
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await service.start()
    # Tell the operator now, not at the first denied user, that the store is not there.
    # The service serves on regardless: internal keys do not need the store.
    try:
        async with asyncio.timeout(policy.backend_timeout):
            await store.get(service_key.public)
    except (StoreError, TimeoutError) as exc:
        log.warning("store_unavailable", bucket=args.users_bucket, detail=str(exc) or "timeout")
    await stop.wait()
    log.info("stopping", inflight=service.inflight)
    await service.stop()
    try:
        async with asyncio.timeout(5):
            await nc.drain()
    except Exception:
        await nc.close()
    log.info("stopped", **vars(service.stats))
    return 0


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer auth-callout requests")
    add(p, "--nats-url", required=True, help="NATS server URL(s), comma-separated")
    add(p, "--nkey-seed-file", required=True, help="the service's user seed (an auth_users nkey)")
    add(p, "--issuer-seed-file", required=True, help="auth_callout.issuer account seed (SA...)")
    add(p, "--xkey-seed-file", action="append", help="auth_callout xkey seed (SX...); repeatable")
    add(p, "--account", required=True, help="account users are placed in by default")
    add(p, "--users-bucket", default="users", help="JetStream KV bucket of user records")
    add(p, "--internal-key", action="append", help="user key admitted without the store")
    add(p, "--internal-permissions", help="JSON permissions for internal keys (default: none)")
    add(p, "--mode", choices=["enforce", "soft"], default="enforce", help="soft admits unknown")
    add(p, "--default-permissions", help="JSON permissions for soft-mode admits (default: none)")
    add(p, "--backend-timeout", type=positive_float, default=1.0, help="store deadline, seconds")
    add(p, "--user-ttl", type=non_negative_float, default=86400.0, help="user JWT life (0: none)")
    add(
        p,
        "--allowed-account",
        action="append",
        help="accounts records may name (default --account)",
    )
    add(p, "--callout-account", default="AUTH", help="auth_callout.account; never placed into")
    add(p, "--system-account", default="SYS", help="the system account; never placed into")
    add(p, "--queue-group", default="callout", help="queue group shared by replicas")
    add(p, "--max-inflight", type=positive_int, default=256, help="requests handled at once")
    add(p, "--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add(p, "--log-format", default="json", choices=["json", "console"])
    p.set_defaults(run=lambda a: serve(a), logs=True)


# --- users ---------------------------------------------------------------------------------------
def _out(doc: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")


def _show(key: str, value: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {"key": key, "invalid_record": value[:200].decode("utf-8", "replace")}
    return {"key": key, **doc} if isinstance(doc, dict) else {"key": key, "invalid_record": doc}


def _subjects(values: Sequence[str] | None, flag: str) -> tuple[str, ...]:
    for subject in values or ():
        if (problem := subject_problem(subject)) is not None:
            fail(f"{flag} {subject!r}: {problem}")
    return tuple(values or ())


async def users(args: argparse.Namespace) -> int:
    # Validate everything the command was given before connecting, so nothing is half-written.
    key = user_key(args.key) if getattr(args, "key", None) else ""
    record: UserRecord | None = None
    if args.action == "add":
        if args.account is not None and (problem := account_problem(args.account)) is not None:
            fail(f"--account {problem}")
        if len(args.name) > 256 or not args.name.isprintable():
            fail("--name must be printable and at most 256 characters")
        record = UserRecord(
            name=args.name,
            admin=args.admin,
            account=args.account,
            permissions=Permissions(
                Rules(
                    _subjects(args.pub_allow, "--pub-allow"), _subjects(args.pub_deny, "--pub-deny")
                ),
                Rules(
                    _subjects(args.sub_allow, "--sub-allow"), _subjects(args.sub_deny, "--sub-deny")
                ),
            ),
        )
    seed = load_signing_key(args.nkey_seed_file, KeyKind.USER, "--nkey-seed-file")
    nc = await connect(args.nats_url, seed, name="callout-users", reconnect=False)
    try:
        await kvstore.ensure_bucket(nc, args.users_bucket, args.replicas)
        bucket = kvstore.KVStore(nc, args.users_bucket)
        if args.action == "add":
            assert record is not None
            if not await kvstore.create(nc, args.users_bucket, key, dump_record(record)):
                fail(f"user {key} already exists (use revoke, or remove it first)")
            _out({"key": key, **record.as_json()})
        elif args.action == "get":
            entry = await bucket.get_entry(key)
            if entry is None:
                print(f"callout: user {key} not found", file=sys.stderr)
                return 1
            _out(_show(key, entry[0]))
        elif args.action == "list":
            async for k, value in kvstore.entries(nc, args.users_bucket):
                _out(_show(k, value))
        elif args.action == "revoke":
            return await _revoke(nc, args.users_bucket, bucket, key)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return 0


async def _revoke(nc: Client, bucket_name: str, bucket: kvstore.KVStore, key: str) -> int:
    # Compare-and-set, so a concurrent edit of the record is not overwritten; retried on conflict.
    for _ in range(5):
        entry = await bucket.get_entry(key)
        if entry is None:
            print(f"callout: user {key} not found", file=sys.stderr)
            return 1
        value, revision = entry
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            # An unreadable record already denies; replace it with a revoked one for the audit.
            doc = {"name": "", "invalid_record_replaced": True}
        doc["revoked"] = True
        if await kvstore.update(nc, bucket_name, key, orjson.dumps(doc), revision):
            _out({"key": key, **doc})
            return 0
    fail(f"user {key} keeps changing under us; try again")


def _add_users(sub: Any) -> None:
    p = sub.add_parser("users", help="manage user records in the KV bucket")
    add(p, "--nats-url", default="nats://127.0.0.1:4222", help="NATS server URL(s)")
    add(p, "--nkey-seed-file", required=True, help="a user seed in the callout account")
    add(p, "--users-bucket", default="users", help="JetStream KV bucket of user records")
    add(
        p,
        "--replicas",
        type=replicas,
        default=None,
        help="replicas if the bucket is created (1..5)",
    )
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", help="add a user (fails if it exists)")
    a.add_argument("key", help="user public nkey (U...)")
    a.add_argument("--name", default="")
    a.add_argument("--admin", action="store_true", help="full access in its account")
    a.add_argument("--account", default=None, help="account (default: the service's --account)")
    for flag in ("--pub-allow", "--pub-deny", "--sub-allow", "--sub-deny"):
        a.add_argument(flag, action="append", metavar="SUBJECT")
    g = actions.add_parser("get", help="print a record as JSON; exit 1 if absent")
    g.add_argument("key")
    actions.add_parser("list", help="print every record, one JSON object per line")
    r = actions.add_parser("revoke", help="mark a user revoked (the record stays)")
    r.add_argument("key")
    p.set_defaults(run=users, logs=False)


# --- keys ----------------------------------------------------------------------------------------
KEY_FILES = {"issuer": "issuer.nk", "service": "service.nk", "xkey": "xkey.nk"}


def generate_keys(out: Path) -> dict[str, str]:
    """Write the three seeds (0600) into `out`; refuse to overwrite. Returns the public keys."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = [name for name in KEY_FILES.values() if (out / name).exists()]
    if existing:
        fail(f"{out} already holds {', '.join(existing)}; refusing to overwrite keys")
    issuer, service, xk = (
        SigningKey.generate(KeyKind.ACCOUNT),
        SigningKey.generate(KeyKind.USER),
        CurveKey.generate(),
    )
    write_secret(out / KEY_FILES["issuer"], issuer.seed)
    write_secret(out / KEY_FILES["service"], service.seed)
    write_secret(out / KEY_FILES["xkey"], xk.seed)
    return {"issuer": issuer.public, "service": service.public, "xkey": xk.public}


async def keys(args: argparse.Namespace) -> int:
    publics = generate_keys(Path(args.out))
    _out({**publics, "dir": str(args.out)})
    print(
        "put these in nats.conf: auth_callout { issuer: "
        f"{publics['issuer']}, auth_users: [{publics['service']}], xkey: {publics['xkey']} }}",
        file=sys.stderr,
    )
    return 0


def _add_keys(sub: Any) -> None:
    p = sub.add_parser("keys", help="key material")
    actions = p.add_subparsers(dest="action", required=True)
    g = actions.add_parser("generate", help="issuer, service and xkey seeds as 0600 files")
    add(g, "--out", required=True, help="directory to write into")
    p.set_defaults(run=keys, logs=False)


# --- connect (a client, to try a user) -----------------------------------------------------------
async def try_connect(args: argparse.Namespace) -> int:
    seed = load_signing_key(args.nkey_seed_file, KeyKind.USER, "--nkey-seed-file")
    try:
        nc = await nats.connect(
            servers=_urls(args.nats_url),
            nkeys_seed_str=seed.seed,
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=_ignore,
        )
    except Exception as exc:
        print(
            f"callout: {seed.public} was not admitted: {str(exc) or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    try:
        print(f"connected as {seed.public}")
        with contextlib.suppress(Exception):
            reply = await nc.request("$SYS.REQ.USER.INFO", b"", timeout=2)
            data = orjson.loads(reply.data).get("data", {})
            print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    finally:
        await nc.close()
    return 0


async def _ignore(_exc: Exception) -> None:
    return None


def _add_connect(sub: Any) -> None:
    p = sub.add_parser("connect", help="connect as a user and show its account and permissions")
    add(p, "--nats-url", default="nats://127.0.0.1:4222")
    add(p, "--nkey-seed-file", required=True, help="the user's seed")
    p.set_defaults(run=try_connect, logs=False)


def _add_dev(sub: Any) -> None:
    from callout import dev

    p = sub.add_parser("dev", help="run everything locally: nats-server, keys, a demo user")
    add(p, "--data-dir", default=".callout-dev", help="keys, config and JetStream data")
    add(p, "--port", type=int, default=4222, help="client port of the bundled nats-server")
    add(p, "--log-format", default="console", choices=["json", "console"])
    p.set_defaults(run=dev.run, logs=True)


# --- main ----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="callout", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    p.add_argument("--version", action="version", version=f"callout {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_users(sub)
    _add_keys(sub)
    _add_dev(sub)
    _add_connect(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "logs", False):
        log.setup(getattr(args, "log_level", "info"), getattr(args, "log_format", "json"))
    try:
        result = args.run(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except (UserError, SeedFileError, KeyError_, RecordError, StoreError) as exc:
        print(f"callout: error: {exc}", file=sys.stderr)
        usage = UserError | SeedFileError | KeyError_ | RecordError | kvstore.BucketConfigError
        return 2 if isinstance(exc, usage) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
