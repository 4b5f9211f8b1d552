"""`callout users`: add, get, list and revoke records in the users bucket."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import orjson
from nats.aio.client import Client

from callout.commands.common import (
    add_identity_flags,
    connect,
    fail,
    identity_from_args,
    user_key,
)
from callout.config import add, replicas
from callout.records import (
    Permissions,
    Rules,
    UserRecord,
    account_problem,
    dump_record,
    subject_problem,
)
from callout.store import kv as kvstore


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
    identity = identity_from_args(args, "callout users")
    nc = await connect(args.nats_url, identity, name="callout-users", reconnect=False)
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


def register(sub: Any) -> None:
    p = sub.add_parser("users", help="manage user records in the KV bucket")
    add(p, "--nats-url", default="nats://127.0.0.1:4222", help="NATS server URL(s)")
    add_identity_flags(p, "a user of the callout account")
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
