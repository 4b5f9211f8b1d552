"""`callout users`: add, get, list and revoke records in the users bucket; import them in bulk
(JSON lines, CSV, SQLite) and export them (the work is in `callout.migrate`; every read and
write of the bucket is `callout.store.kv`'s)."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client

from callout import migrate
from callout.connection import Identity, connect, load_identity
from callout.errors import fail
from callout.records import (
    Permissions,
    RecordError,
    Rules,
    UserRecord,
    account_problem,
    dump_record,
    parse_record,
    subject_problem,
)
from callout.settings import UsersSettings, add_flags, from_args, user_key
from callout.store import StoreError
from callout.store import kv as kvstore


def _out(doc: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")


def _show(key: str, value: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {"key": key, "invalid_record": value[:200].decode("utf-8", "replace")}
    if not isinstance(doc, dict):
        return {"key": key, "invalid_record": doc}
    # The bucket key wins over any "key" field a record may carry (it would misname the user).
    return {"key": key, **{k: v for k, v in doc.items() if k != "key"}}


def _subjects(values: Sequence[str] | None, flag: str) -> tuple[str, ...]:
    for subject in values or ():
        if (problem := subject_problem(subject)) is not None:
            fail(f"{flag} {subject!r}: {problem}")
    return tuple(values or ())


def run(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    settings = from_args(UsersSettings, args)
    if args.action in _BULK:
        return _bulk(settings, args)
    return users(settings, args)


async def users(settings: UsersSettings, args: argparse.Namespace) -> int:
    """One action of `args` (its own arguments) on the bucket `settings` name."""
    # Validate everything the command was given before connecting, so nothing is half-written.
    key = user_key(args.key) if args.action != "list" else ""
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
    identity = load_identity(settings.identity, "callout users")
    nc = await connect(settings.nats_url, identity, name="callout-users", reconnect=False)
    try:
        await kvstore.ensure_bucket(nc, settings.users_bucket, settings.replicas)
        bucket = kvstore.KVStore(nc, settings.users_bucket)
        if args.action == "add":
            assert record is not None
            if not await kvstore.create(nc, settings.users_bucket, key, dump_record(record)):
                fail(f"user {key} already exists (use revoke, or remove it first)")
            _out({"key": key, **record.as_json()})
        elif args.action == "get":
            entry = await bucket.get_entry(key)
            if entry is None:
                print(f"callout: user {key} not found", file=sys.stderr)
                return 1
            _out(_show(key, entry[0]))
        elif args.action == "list":
            # One ordered-consumer pass that checks it reached the stream's end, not a key
            # listing followed by a get per key (nats-py's listing can come back short).
            for k, value in await kvstore.entries(nc, settings.users_bucket):
                _out(_show(k, value))
        elif args.action == "revoke":
            return await _revoke(nc, settings.users_bucket, bucket, key, args.keep_sessions)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return 0


async def _revoke(
    nc: Client, bucket_name: str, bucket: kvstore.KVStore, key: str, keep_sessions: bool = False
) -> int:
    # Compare-and-set, so a concurrent edit of the record is not overwritten; retried on conflict.
    for _ in range(5):
        entry = await bucket.get_entry(key)
        if entry is None:
            print(f"callout: user {key} not found", file=sys.stderr)
            return 1
        value, revision = entry
        try:
            parse_record(value)
            doc = orjson.loads(value)
        except RecordError:
            # An unreadable record already denies; replace it with a valid revoked one, so
            # the revocation is what the record says (the old value stays in the history).
            doc = {"name": "", "meta": {"invalid_record_replaced": True}}
        doc["revoked"] = True
        # Read by the service's live revocation: true leaves the user's live connections be.
        doc["keep_sessions"] = keep_sessions
        if await kvstore.update(nc, bucket_name, key, orjson.dumps(doc), revision):
            _out({"key": key, **doc})
            return 0
    fail(f"user {key} keeps changing under us; try again")


def register(sub: Any) -> None:
    p = sub.add_parser("users", help="manage user records in the KV bucket")
    add_flags(p, UsersSettings)
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
    r.add_argument(
        "--keep-sessions",
        action="store_true",
        help="do not close the user's live connections (new ones are denied either way)",
    )
    r.add_argument("key")
    _register_bulk(actions)
    p.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------
# import, import-sqlite, export
# ---------------------------------------------------------------------------------------------
_BULK = ("import", "import-sqlite", "export")
_COLUMN_FIELDS = ("key", *migrate.FIELDS)


def _say(line: str) -> None:
    print(f"callout: {line}", file=sys.stderr)


async def _bulk(settings: UsersSettings, args: argparse.Namespace) -> int:
    identity = load_identity(settings.identity, "callout users")
    if args.action == "export":
        return await _export(settings, identity)
    # The whole input is read and validated before connecting: invalid rows write nothing.
    try:
        if args.action == "import":
            collected = _read_file(args.file, args.format)
        else:
            columns = {name: getattr(args, f"{name}_column") for name in _COLUMN_FIELDS}
            source = migrate.SqliteSource(args.db, args.table, columns)
            mapped = ", ".join(f"{name} <- {col!r}" for name, col in source.mapping.items())
            unread = [name for name in _COLUMN_FIELDS if name not in source.mapping]
            _say(
                f"table {source.table!r}: {mapped}"
                + (f"; not read: {', '.join(unread)}" if unread else "")
            )
            collected = migrate.collect(source)
    except migrate.SourceError as exc:
        fail(str(exc))
    if collected.invalid:
        return _finish(migrate.Report.of(collected, dry_run=args.dry_run, planned=False))
    nc = await connect(settings.nats_url, identity, name="callout-users", reconnect=False)
    try:
        bucket = await kvstore.open_bucket(
            nc, settings.users_bucket, create=not args.dry_run, replicas=settings.replicas
        )
        await migrate.plan(bucket, collected.items, overwrite=args.overwrite)
        if not args.dry_run:
            assert bucket is not None  # created when missing
            await migrate.apply(bucket, collected.items.values())
    except nats.errors.Error as exc:
        raise StoreError(f"NATS error: {type(exc).__name__}") from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return _finish(migrate.Report.of(collected, dry_run=args.dry_run, planned=True))


def _read_file(path: str, fmt: str | None) -> migrate.Collected:
    fmt = fmt or ("csv" if path.lower().endswith(".csv") else "jsonl")
    try:
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    with stream:
        if fmt == "csv":
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
            return migrate.collect(migrate.read_csv(text))
        return migrate.collect(migrate.read_jsonl(stream))


def _finish(report: migrate.Report) -> int:
    for line in report.lines():
        _say(line)
    _out(report.summary())
    return 0 if report.ok else 1


async def _export(settings: UsersSettings, identity: Identity) -> int:
    nc = await connect(settings.nats_url, identity, name="callout-users", reconnect=False)
    try:
        bucket = settings.users_bucket
        if await kvstore.open_bucket(nc, bucket, create=False, replicas=None) is None:
            raise StoreError(f"bucket {bucket!r} does not exist")
        entries = await kvstore.entries(nc, bucket)
    except nats.errors.Error as exc:
        raise StoreError(f"NATS error: {type(exc).__name__}") from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    out = sys.stdout.buffer
    exported = problems = 0
    for key, value in entries:
        line, problem = migrate.export_line(key, value)
        if line is not None:
            out.write(line)
            exported += 1
        if problem is not None:
            problems += 1
            _say(f"{key}: {problem}")
    out.flush()
    _say(f"exported {exported} of {len(entries)} records")
    # Non-zero when the output would not import cleanly, so a backup job notices.
    return 1 if problems else 0


def _register_bulk(actions: Any) -> None:
    def apply_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dry-run", action="store_true", help="report what would change, write nothing"
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace existing records that differ (default: report them as conflicting)",
        )

    i = actions.add_parser(
        "import", help="add records from JSON lines or CSV; every row is validated first"
    )
    i.add_argument("file", help="JSON lines (as `export` writes) or CSV with a header; - is stdin")
    i.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        default=None,
        help="default: csv for *.csv, else jsonl",
    )
    apply_flags(i)
    s = actions.add_parser(
        "import-sqlite", help="add records from a table of an SQLite database (opened read-only)"
    )
    s.add_argument("db", help="SQLite database file")
    s.add_argument("--table", default="users", help="table or view to read (default: users)")
    what = {
        "key": "user public key",
        "admin": "admin flag (0/1)",
        "revoked": "revoked flag (0/1)",
        "permissions": "permissions object as JSON",
    }
    for name in _COLUMN_FIELDS:
        s.add_argument(
            f"--{name}-column",
            default=None,
            metavar="COLUMN",
            help=f"column holding the {what.get(name, name)} (default: the column named {name!r}"
            + (")" if name == "key" else ", if there is one)"),
        )
    apply_flags(s)
    actions.add_parser(
        "export", help="print every record as JSON lines sorted by key (import reads them back)"
    )
